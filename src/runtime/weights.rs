//! Tensors of a safetensors file, memory-mapped and converted to float32 candle tensors, with
//! names checked against what a model expects. Quantized checkpoints written by
//! `lowbit quantize` load too: their tensors are dequantized once from the stored codes, and
//! those `checkpoint::TERNARY_KEY` lists keep their ternary codes for the packed kernel.
use super::ce;
use super::layers::{Embedding, InputTransform, LayerNorm, Linear, WeightMode};
use crate::bitnet::linear::TernaryLinear;
use crate::ptq::Rotation;
use crate::quant::affine::Codes;
use crate::quant::checkpoint::{
    self, check_ternary_tensor, float_data, map_file, parse, ternary_names, Entry, FloatData,
    FORMAT_KEY, TERNARY_KEY,
};
use crate::quant::spec::QuantizedTensor;
use crate::{ensure, Error, Result};
use candle_core::{Device, Tensor};
use ndarray::Array2;
use safetensors::tensor::TensorView;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::path::Path;

pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Tensors stored quantized in the file, as stored (the integer GEMM takes their codes).
    quantized: BTreeMap<String, QuantizedTensor>,
    /// The tensors `lowbit.ternary` lists: codes as (rows, everything else) and the scale.
    ternary: BTreeMap<String, (Array2<i8>, f32)>,
    metadata: HashMap<String, String>,
    /// What [`INPUT_TRANSFORMS_KEY`] says each listed weight's layer does to its input.
    transforms: BTreeMap<String, InputTransform>,
}

/// The metadata key listing weights stored in another basis than their layer's inputs (by
/// `lowbit.ptq`: rotated or AWQ-scaled): a JSON object of weight name to
/// `{"scales": [s_j...], "rotation_seed": seed}` (each optional), the layer computing
/// `W' · ((x / s) R)` with `R` the rotation of `lowbit.ptq.Rotation(in_features, seed)`.
pub const INPUT_TRANSFORMS_KEY: &str = "lowbit.input_transforms";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformEntry {
    scales: Option<Vec<f32>>,
    rotation_seed: Option<u64>,
}

/// The transforms the metadata lists, for weights the file holds (`features` of each: its
/// columns), checked.
fn input_transforms(
    meta: &HashMap<String, String>,
    features: impl Fn(&str) -> Option<usize>,
    path: &Path,
) -> Result<BTreeMap<String, InputTransform>> {
    let bad = |e: String| Error::format(format!("{}: {INPUT_TRANSFORMS_KEY}: {e}", path.display()));
    let Some(text) = meta.get(INPUT_TRANSFORMS_KEY) else {
        return Ok(BTreeMap::new());
    };
    let entries: BTreeMap<String, TransformEntry> =
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    entries
        .into_iter()
        .map(|(name, e)| {
            let k = features(&name)
                .ok_or_else(|| bad(format!("{name} is not a matrix of the file")))?;
            if let Some(s) = &e.scales {
                if s.len() != k || !s.iter().all(|v| v.is_finite() && *v > 0.0) {
                    return Err(bad(format!(
                        "{name}: the scales must be {k} positive finite values"
                    )));
                }
            }
            let rotation = e
                .rotation_seed
                .map(|seed| Rotation::new(k, seed))
                .transpose()?;
            let t = InputTransform {
                scales: e.scales,
                rotation,
            };
            Ok((name, t))
        })
        .collect()
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

/// The codes (rows, everything else) and scale of a tensor `TERNARY_KEY` lists, checked.
fn ternary_codes(name: &str, t: &QuantizedTensor) -> Result<(Array2<i8>, f32)> {
    check_ternary_tensor(name, t)?;
    ensure!(
        t.shape.len() >= 2 && t.zero_points.iter().all(|&z| z == 0),
        "{name} is listed in {TERNARY_KEY} but is not a matrix with zero point 0 (shape {:?})",
        t.shape
    );
    let (Codes::I8(codes), Some(&scale)) = (t.int_codes()?, t.scales.iter().next()) else {
        return Err(Error::value(format!("{name}: no signed codes or no scale")));
    };
    let cols = t.shape[1..].iter().product();
    let codes = Array2::from_shape_vec((t.shape[0], cols), codes.into_raw_vec_and_offset().0)
        .map_err(|e| Error::value(format!("{name}: {e}")))?;
    Ok((codes, scale))
}

impl Weights {
    /// Loads every F32, F16 and BF16 tensor of a safetensors file (memory-mapped; each tensor
    /// is converted to float32 once), and the file's metadata. A file with a `lowbit.sha256`
    /// must match it (`integrity`); one whose header claims more than it holds is refused first.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_bytes(&map_file(path)?, path)
    }

    /// `load` of a file already in memory (`path` only names it in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let (st, meta) = parse(bytes, path)?;
        let mut w = if meta.contains_key(FORMAT_KEY) {
            Self::from_entries(checkpoint::entries(&st, &meta, path)?, &meta, path)?
        } else {
            ensure_no_ternary(&meta, path)?;
            let mut tensors = BTreeMap::new();
            for (name, view) in st.tensors() {
                if let Some(t) = to_tensor(&view)? {
                    tensors.insert(name, t);
                }
            }
            Weights::from_map(tensors)
        };
        w.transforms = input_transforms(
            &meta,
            |n| {
                let d = w.tensors.get(n)?.dims().to_vec();
                (d.len() >= 2).then(|| d[1..].iter().product())
            },
            path,
        )?;
        w.metadata = meta;
        Ok(w)
    }

    /// The tensors of a quantized checkpoint: quantized ones dequantized once, float ones as is,
    /// the codes of those `lowbit.ternary` lists kept.
    fn from_entries(
        entries: Vec<(String, Entry)>,
        meta: &HashMap<String, String>,
        path: &Path,
    ) -> Result<Self> {
        let mut want = ternary_set(meta, path)?;
        let mut w = Weights::from_map(BTreeMap::new());
        for (name, entry) in entries {
            let t = match entry {
                Entry::Quantized { tensor, .. } => {
                    if want.remove(&name) {
                        let tc = ternary_codes(&name, &tensor)
                            .map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
                        w.ternary.insert(name.clone(), tc);
                    }
                    let d = tensor.dequantize()?;
                    let t = Tensor::from_vec(
                        d.into_raw_vec_and_offset().0,
                        tensor.shape.clone(),
                        &Device::Cpu,
                    )
                    .map_err(ce)?;
                    w.quantized.insert(name.clone(), tensor);
                    Some(t)
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
        if let Some(name) = want.iter().next() {
            return Err(Error::format(format!(
                "{}: {name} is listed in {TERNARY_KEY} but not stored quantized",
                path.display()
            )));
        }
        Ok(w)
    }

    /// The file's metadata (the safetensors header's `__metadata__`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The codes (rows, rest) and scale of a tensor stored as ternary.
    pub fn ternary(&self, name: &str) -> Option<(&Array2<i8>, f32)> {
        self.ternary.get(name).map(|(c, s)| (c, *s))
    }

    /// Whether the file stored `name` quantized (its codes are then used as stored).
    pub fn is_quantized(&self, name: &str) -> bool {
        self.quantized.contains_key(name)
    }

    pub fn from_map(tensors: BTreeMap<String, Tensor>) -> Self {
        Weights {
            tensors,
            quantized: BTreeMap::new(),
            ternary: BTreeMap::new(),
            metadata: HashMap::new(),
            transforms: BTreeMap::new(),
        }
    }

    /// The linear layer of weight `name` ((out, in), or (out, ...) flattened as a convolution's)
    /// and bias `bias`: on the packed ternary kernel when the file stores it as ternary, on the
    /// stored codes when it stores it quantized otherwise (the integer GEMM with 8-bit
    /// activations, else dequantized once; never re-quantized), else quantized with `mode`;
    /// then `act_bits`, and the input transform [`INPUT_TRANSFORMS_KEY`] lists for it.
    pub fn linear(
        &self,
        name: &str,
        bias: Option<&str>,
        mode: WeightMode,
        act_bits: Option<u32>,
    ) -> Result<Linear> {
        let bias = bias.map(|b| self.get(b)).transpose()?;
        let layer = self.linear_as_stored(name, bias, mode, act_bits)?;
        match self.transforms.get(name) {
            Some(t) => layer.with_input(t.clone()),
            None => Ok(layer),
        }
    }

    /// [`Weights::linear`] without the input transform.
    fn linear_as_stored(
        &self,
        name: &str,
        bias: Option<Tensor>,
        mode: WeightMode,
        act_bits: Option<u32>,
    ) -> Result<Linear> {
        if let Some((codes, scale)) = self.ternary(name) {
            let b = bias.as_ref().map(super::layers::to_vec).transpose()?;
            return Linear::from_ternary(TernaryLinear::new(codes.view(), vec![scale], b)?)
                .with_act_bits(act_bits);
        }
        if let Some(q) = self.quantized.get(name) {
            if Linear::takes_integer_gemm(q, act_bits) {
                return Linear::from_quantized(q, bias, act_bits);
            }
        }
        // Float weights, or quantized ones as loaded (dequantized once, never re-quantized).
        let mode = if self.is_quantized(name) {
            WeightMode::F32
        } else {
            mode
        };
        let w = self.get(name)?;
        let w = match w.dims() {
            [_, _] => w,
            [out, rest @ ..] if !rest.is_empty() => w
                .reshape((*out, rest.iter().product::<usize>()))
                .map_err(ce)?,
            d => {
                return Err(Error::value(format!(
                    "weight '{name}' has shape {d:?}, not a matrix"
                )))
            }
        };
        Linear::new(w, bias, mode, act_bits)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Checks that every expected name is present with its shape, and that no other tensor is
    /// (except those `ignore` accepts); the error lists everything wrong at once.
    /// Refuses a config whose layer count alone needs more tensors than the file holds, before
    /// the names it expects are built (a corrupt count of 10^9 would take minutes and gigabytes).
    pub fn ensure_layers(&self, layers: usize) -> Result<()> {
        if layers > self.tensors.len() {
            return Err(Error::format(format!(
                "the config asks for {layers} layers, but the file holds only {} tensors",
                self.tensors.len()
            )));
        }
        Ok(())
    }

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
                // A convolution's weight may be stored as its matrix (out, in · kh · kw): as
                // post-training quantization groups it.
                let matrix = s.len() > 2 && t.dims() == [s[0], s[1..].iter().product::<usize>()];
                (t.dims() != s.as_slice() && !matrix)
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

    /// The tensors whose names start with `prefix` (`"bert."`; `""` for all), by the rest of
    /// their names.
    pub fn scope(&self, prefix: &str) -> Scope<'_> {
        Scope {
            w: self,
            prefix: Prefix::new(prefix),
        }
    }

    /// The tensors of module `part` (`w.pp("vision").pp("blocks").pp(0)`).
    pub fn pp(&self, part: impl Display) -> Scope<'_> {
        self.scope("").pp(part)
    }
}

/// A tensor name prefix, empty or ending in `.`: the names of one module's tensors, built one
/// path segment at a time as torch's `state_dict()` joins them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// `prefix` as given (empty, or ending in `.`).
    pub fn new(prefix: &str) -> Self {
        Prefix(prefix.to_string())
    }

    /// The prefix of submodule `part`.
    pub fn pp(&self, part: impl Display) -> Self {
        Prefix(format!("{}{part}.", self.0))
    }

    /// The full name of this module's tensor `name`.
    pub fn name(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }

    /// The module's own name (the prefix without its trailing `.`), as recorded layers are named.
    pub fn module(&self) -> String {
        self.0.trim_end_matches('.').to_string()
    }
}

/// The tensors of one module of a `Weights` (candle-nn's `VarBuilder::pp`): names relative to
/// the module, the errors of `Weights` with the full names.
#[derive(Clone)]
pub struct Scope<'a> {
    w: &'a Weights,
    prefix: Prefix,
}

impl<'a> Scope<'a> {
    /// The tensors of submodule `part`.
    pub fn pp(&self, part: impl Display) -> Scope<'a> {
        Scope {
            w: self.w,
            prefix: self.prefix.pp(part),
        }
    }

    pub fn prefix(&self) -> &Prefix {
        &self.prefix
    }

    /// The full name of this module's tensor `name`.
    pub fn name(&self, name: &str) -> String {
        self.prefix.name(name)
    }

    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.w.get(&self.name(name))
    }

    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.w.get_opt(&self.name(name))
    }

    /// This module as a linear layer of `weight` and `bias` (see `Weights::linear`).
    pub fn linear(&self, mode: WeightMode, act_bits: Option<u32>) -> Result<Linear> {
        self.w.linear(
            &self.name("weight"),
            Some(&self.name("bias")),
            mode,
            act_bits,
        )
    }

    /// This module as a layer norm of `weight` and `bias`.
    pub fn layer_norm(&self, eps: f64) -> Result<LayerNorm> {
        LayerNorm::new(&self.get("weight")?, &self.get("bias")?, eps)
    }

    /// This module as an embedding table `weight`.
    pub fn embedding(&self) -> Result<Embedding> {
        Embedding::new(self.get("weight")?)
    }
}

/// The names `TERNARY_KEY` lists (none without the key).
fn ternary_set(meta: &HashMap<String, String>, path: &Path) -> Result<BTreeSet<String>> {
    meta.get(TERNARY_KEY).map_or(Ok(BTreeSet::new()), |list| {
        ternary_names(list)
            .map(|v| v.into_iter().collect())
            .map_err(|e| Error::format(format!("{}: {e}", path.display())))
    })
}

/// A plain (not quantized) file cannot store ternary codes.
fn ensure_no_ternary(meta: &HashMap<String, String>, path: &Path) -> Result<()> {
    if let Some(name) = ternary_set(meta, path)?.into_iter().next() {
        return Err(Error::format(format!(
            "{}: {name} is listed in {TERNARY_KEY} but the file is not a lowbit quantized \
             checkpoint ({FORMAT_KEY} is missing)",
            path.display()
        )));
    }
    Ok(())
}
