//! Tensors of a safetensors file, memory-mapped and converted to float32 candle tensors, with
//! names checked against what a model expects.
use super::ce;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

fn to_f32(dtype: Dtype, bytes: &[u8], name: &str) -> Result<Vec<f32>> {
    let cast = |n: usize| -> Result<()> {
        if bytes.len() % n == 0 {
            Ok(())
        } else {
            Err(Error::format(format!(
                "tensor '{name}' has a truncated payload"
            )))
        }
    };
    Ok(match dtype {
        Dtype::F32 => {
            cast(4)?;
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        }
        Dtype::F16 => {
            cast(2)?;
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect()
        }
        Dtype::BF16 => {
            cast(2)?;
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect()
        }
        other => {
            return Err(Error::format(format!(
                "tensor '{name}' is {other:?}; the runtime loads F32, F16 and BF16 weights"
            )))
        }
    })
}

impl Weights {
    /// Loads every float tensor of a safetensors file (memory-mapped; each tensor is converted
    /// to float32 once).
    pub fn load(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        // Safety: the map is read-only and dropped before this function returns; a file changed
        // underneath would give wrong numbers, not memory unsafety in safe code that reads bytes.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io(format!("cannot map {}", path.display()), e))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| {
            Error::format(format!(
                "{} is not a valid safetensors file: {e}",
                path.display()
            ))
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                continue; // integer buffers (position ids) are not weights
            }
            let data = to_f32(view.dtype(), view.data(), &name)?;
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
