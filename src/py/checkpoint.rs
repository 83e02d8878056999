//! Bindings of `crate::quant::checkpoint`: quantized safetensors files.
use super::quant::{QuantSpec, QuantizedTensor};
use super::{detach, type_error, value_error};
use crate::quant::checkpoint::{self, Entry, Report};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

fn reports(py: Python<'_>, rs: Vec<Report>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    rs.into_iter()
        .map(|r| {
            let d = PyDict::new(py);
            d.set_item("name", r.name)?;
            d.set_item("shape", r.shape)?;
            d.set_item("dtype", r.dtype)?;
            d.set_item("bits", r.bits)?;
            d.set_item("sqnr_db", r.sqnr_db)?;
            d.set_item("bytes_before", r.bytes_before)?;
            d.set_item("bytes_after", r.bytes_after)?;
            Ok(d)
        })
        .collect()
}

#[pyfunction]
#[pyo3(signature = (src, dst, spec, include=Vec::new(), exclude=Vec::new()))]
pub fn quantize_checkpoint<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    spec: &QuantSpec,
    include: Vec<String>,
    exclude: Vec<String>,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let sp = spec.0;
    let filter = checkpoint::TensorFilter { include, exclude };
    let rs = detach(py, || {
        checkpoint::quantize_file_filtered(&src, &dst, sp, &filter)
    })?;
    reports(py, rs)
}

#[pyfunction]
pub fn dequantize_checkpoint<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let rs = detach(py, || checkpoint::dequantize_file(&src, &dst))?;
    reports(py, rs)
}

/// Loads a quantized checkpoint: `{name: QuantizedTensor}` for the quantized tensors and
/// `{name: (dtype, shape, bytes)}` for the others.
#[pyfunction]
pub fn load_quantized<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let entries = detach(py, || checkpoint::load(&path))?;
    let d = PyDict::new(py);
    for (name, e) in entries {
        match e {
            Entry::Quantized { tensor, .. } => d.set_item(name, QuantizedTensor(tensor))?,
            Entry::Raw { dtype, shape, data } => d.set_item(
                name,
                (
                    format!("{dtype:?}"),
                    shape,
                    pyo3::types::PyBytes::new(py, &data),
                ),
            )?,
        }
    }
    Ok(d)
}

/// Writes `{name: QuantizedTensor | (dtype, shape, bytes)}` as a lowbit checkpoint with
/// `metadata`, atomically (the core of `lowbit.save_checkpoint`).
#[pyfunction]
#[pyo3(signature = (path, tensors, metadata=None))]
pub fn save_checkpoint(
    py: Python<'_>,
    path: PathBuf,
    tensors: &Bound<'_, PyDict>,
    metadata: Option<std::collections::BTreeMap<String, String>>,
) -> PyResult<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    for (k, v) in tensors.iter() {
        let name: String = k.extract()?;
        let entry = if let Ok(q) = v.cast::<QuantizedTensor>() {
            Entry::Quantized {
                tensor: q.borrow().0.clone(),
                dtype: safetensors::Dtype::F32,
            }
        } else {
            let (dtype, shape, data): (String, Vec<usize>, Vec<u8>) =
                v.extract().map_err(|_| {
                    type_error(format!(
                        "tensor {name:?} must be a QuantizedTensor or (dtype, shape, bytes)"
                    ))
                })?;
            Entry::Raw {
                dtype: checkpoint::dtype_from_name(&dtype).ok_or_else(|| {
                    value_error(format!("tensor {name:?}: unknown dtype {dtype:?}"))
                })?,
                shape,
                data,
            }
        };
        entries.push((name, entry));
    }
    let meta = metadata.unwrap_or_default();
    detach(py, || checkpoint::save(&path, &entries, &meta))
}

/// The string metadata of a safetensors file's header.
#[pyfunction]
pub fn checkpoint_metadata(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<std::collections::BTreeMap<String, String>> {
    detach(py, || checkpoint::metadata(&path))
}
