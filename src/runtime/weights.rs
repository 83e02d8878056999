//! Tensors of a safetensors file, memory-mapped and converted to float32 candle tensors, with
//! names checked against what a model expects. Quantized checkpoints written by
//! `lowbit quantize` load too: their tensors are dequantized once from the stored codes.
use super::ce;
use crate::quant::checkpoint::{self, float_data, map_file, parse, Entry, FloatData, FORMAT_KEY};
use crate::quant::spec::QuantSpec;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use safetensors::tensor::TensorView;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Tensors stored quantized in the file, with their spec.
    quantized: BTreeMap<String, QuantSpec>,
}

/// A float tensor of the file as float32 (None for integer buffers and f64, which no layer
/// of the runtime takes as a weight).
fn to_tensor(view: &TensorView<'_>) -> Result<Option<Tensor>> {
    let data: Vec<f32> = match float_data(view) {
        Some(FloatData::F32(v)) => v.into_owned(),
        Some(FloatData::F16(v)) => v.iter().map(|x| x.to_f32()).collect(),
        Some(FloatData::BF16(v)) => v.iter().map(|x| x.to_f32()).collect(),
        Some(FloatData::F64(_)) | None => return Ok(None),
    };
    Tensor::from_vec(data, view.shape(), &Device::Cpu)
        .map(Some)
        .map_err(ce)
}

impl Weights {
    /// Loads every F32, F16 and BF16 tensor of a safetensors file (memory-mapped; each tensor
    /// is converted to float32 once).
    pub fn load(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let (st, meta) = parse(&map, path)?;
        if meta.contains_key(FORMAT_KEY) {
            return Self::from_entries(checkpoint::entries(&st, &meta, path)?);
        }
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if let Some(t) = to_tensor(&view)? {
                tensors.insert(name, t);
            }
        }
        Ok(Weights {
            tensors,
            quantized: BTreeMap::new(),
        })
    }

    /// The tensors of a quantized checkpoint: quantized ones dequantized once, float ones as is.
    fn from_entries(entries: Vec<(String, Entry)>) -> Result<Self> {
        let mut w = Weights {
            tensors: BTreeMap::new(),
            quantized: BTreeMap::new(),
        };
        for (name, entry) in entries {
            let t = match entry {
                Entry::Quantized { tensor, .. } => {
                    let d = tensor.dequantize()?;
                    w.quantized.insert(name.clone(), tensor.spec);
                    Some(
                        Tensor::from_vec(d.into_raw_vec_and_offset().0, tensor.shape, &Device::Cpu)
                            .map_err(ce)?,
                    )
                }
                Entry::Raw { dtype, shape, data } => {
                    let view = TensorView::new(dtype, shape, &data)
                        .map_err(|e| Error::format(format!("tensor {name}: {e}")))?;
                    to_tensor(&view)?
                }
            };
            if let Some(t) = t {
                w.tensors.insert(name, t);
            }
        }
        Ok(w)
    }

    /// Whether the file stored `name` quantized (its codes are then used as stored).
    pub fn is_quantized(&self, name: &str) -> bool {
        self.quantized.contains_key(name)
    }

    /// The spec of each tensor the file stored quantized.
    pub fn quantized(&self) -> &BTreeMap<String, QuantSpec> {
        &self.quantized
    }

    pub fn from_map(tensors: BTreeMap<String, Tensor>) -> Self {
        Weights {
            tensors,
            quantized: BTreeMap::new(),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Checks that every expected name is present with its shape, and that no other tensor is
    /// (except those `ignore` accepts); the error lists everything wrong at once.
    pub fn check(
        &self,
        expected: &[(String, Vec<usize>)],
        ignore: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let want: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<&str> = want
            .iter()
            .copied()
            .filter(|n| !self.tensors.contains_key(*n))
            .collect();
        let unexpected: Vec<&str> = self
            .tensors
            .keys()
            .map(String::as_str)
            .filter(|n| !want.contains(n) && !ignore(n))
            .collect();
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(n, s)| {
                let t = self.tensors.get(n)?;
                (t.dims() != s.as_slice())
                    .then(|| format!("{n}: {:?} in the file, {s:?} expected", t.dims()))
            })
            .collect();
        if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
            return Ok(());
        }
        let mut msg = String::from("the weights do not match the model:");
        if !missing.is_empty() {
            msg += &format!(" missing {missing:?};");
        }
        if !unexpected.is_empty() {
            msg += &format!(" unexpected {unexpected:?};");
        }
        if !wrong.is_empty() {
            msg += &format!(" wrong shapes {wrong:?};");
        }
        Err(Error::value(msg.trim_end_matches(';').to_string()))
    }

    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::value(format!("weight '{name}' is missing")))
    }

    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }
}
