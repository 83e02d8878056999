//! Tensors of a safetensors file, memory-mapped and converted to float32 candle tensors, with
//! names checked against what a model expects.
use super::ce;
use crate::quant::checkpoint::{float_data, map_file, parse, FloatData};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// Loads every F32, F16 and BF16 tensor of a safetensors file (memory-mapped; each tensor
    /// is converted to float32 once).
    pub fn load(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let (st, _) = parse(&map, path)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data: Vec<f32> = match float_data(&view) {
                Some(FloatData::F32(v)) => v.into_owned(),
                Some(FloatData::F16(v)) => v.iter().map(|x| x.to_f32()).collect(),
                Some(FloatData::BF16(v)) => v.iter().map(|x| x.to_f32()).collect(),
                // Integer buffers (position ids) are not weights; f64 is not a weight dtype here.
                Some(FloatData::F64(_)) | None => continue,
            };
            let t = Tensor::from_vec(data, view.shape(), &Device::Cpu).map_err(ce)?;
            tensors.insert(name, t);
        }
        Ok(Weights { tensors })
    }

    pub fn from_map(tensors: BTreeMap<String, Tensor>) -> Self {
        Weights { tensors }
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
