//! Bindings of `crate::gguf`: GGML block codecs and GGUF files.
use super::convert::{bytes_to_numpy, gguf_value, ToNumpy};
use super::quant::QuantizedTensor;
use super::{detach, value_error};
use crate::gguf::{self, GgmlType, Loaded};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;

/// The shape of `x` with its last axis replaced by `last`, after checking that the last axis is
/// a whole number of blocks of `per_block`.
fn row_shape(shape: &[usize], per_block: usize, what: &str, ty: GgmlType) -> PyResult<usize> {
    let k = *shape
        .last()
        .ok_or_else(|| value_error(format!("{what} must have at least one dimension")))?;
    if k % per_block != 0 {
        return Err(value_error(format!(
            "{what}'s last axis ({k}) is not a whole number of {} blocks ({per_block} per block)",
            ty.name
        )));
    }
    Ok(k / per_block)
}

/// `gguf_quantize(x, ggml_type, name="x")`: float32 `x` as the bytes of `ggml_type`, shaped
/// `(*x.shape[:-1], bytes per row)` (as `gguf.quants.quantize` shapes block types); errors call
/// the input `name`.
#[pyfunction]
#[pyo3(signature = (x, ggml_type, name="x"))]
pub fn gguf_quantize<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    ggml_type: &str,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let ty = GgmlType::from_name(ggml_type).map_err(super::to_pyerr)?;
    let mut shape = x.shape().to_vec();
    let blocks = row_shape(&shape, ty.block, name, ty)?;
    let a = x.as_array();
    let bytes = detach(py, || {
        let a = a.as_standard_layout();
        gguf::quantize(a.as_slice().expect("standard layout"), ty, name)
    })?;
    *shape.last_mut().expect("checked") = blocks * ty.size;
    bytes_to_numpy(py, bytes, &shape)
}

/// `gguf_dequantize(data, ggml_type)`: uint8 `data` (rows of whole blocks) decoded to float32,
/// shaped `(*data.shape[:-1], elements per row)`, as `gguf.quants.dequantize` does.
#[pyfunction]
pub fn gguf_dequantize<'py>(
    py: Python<'py>,
    data: PyReadonlyArrayDyn<'py, u8>,
    ggml_type: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let ty = GgmlType::from_name(ggml_type).map_err(super::to_pyerr)?;
    let mut shape = data.shape().to_vec();
    let blocks = row_shape(&shape, ty.size, "data", ty)?;
    let a = data.as_array();
    let values = detach(py, || {
        let a = a.as_standard_layout();
        gguf::dequantize(a.as_slice().expect("standard layout"), ty)
    })?;
    *shape.last_mut().expect("checked") = blocks * ty.block;
    let arr = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values)
        .map_err(|e| value_error(e.to_string()))?;
    Ok(f32::to_numpy(arr, py))
}

type Tensors<'py> = Vec<(String, &'static str, Bound<'py, PyAny>, bool)>;

/// `load_gguf(path, dequantize)`: `(version, [(key, value, GGUF type)], [(name, GGML type,
/// QuantizedTensor | float32 array, exact)])` in file order.
#[pyfunction]
#[pyo3(signature = (path, dequantize=false))]
#[allow(clippy::type_complexity)]
pub fn load_gguf<'py>(
    py: Python<'py>,
    path: PathBuf,
    dequantize: bool,
) -> PyResult<(u32, Vec<(String, Bound<'py, PyAny>, String)>, Tensors<'py>)> {
    let (version, meta, loaded) = detach(py, || {
        let map = crate::quant::checkpoint::map_file(&path)?;
        let g = gguf::parse(&map)
            .map_err(|e| crate::Error::format(format!("{}: {e}", path.display())))?;
        let mut out = Vec::with_capacity(g.tensors.len());
        for t in &g.tensors {
            let l = if dequantize {
                let v = gguf::dequantize(g.data(t), t.ty).map_err(|_| {
                    crate::Error::format(format!(
                        "tensor {:?} has GGML type {}, which lowbit does not decode",
                        t.name, t.ty.name
                    ))
                })?;
                Loaded::Float(
                    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&t.shape()), v)
                        .map_err(|e| crate::Error::format(e.to_string()))?,
                )
            } else {
                gguf::to_lowbit(&g, t)?
            };
            out.push((t.name.clone(), t.ty.name, l));
        }
        Ok((g.version, g.metadata, out))
    })?;
    let meta = meta
        .iter()
        .map(|(k, v)| Ok((k.clone(), gguf_value(py, v)?, v.type_name())))
        .collect::<PyResult<Vec<_>>>()?;
    let tensors = loaded
        .into_iter()
        .map(|(name, ty, l)| {
            Ok(match l {
                Loaded::Quantized { tensor, exact } => (
                    name,
                    ty,
                    Bound::new(py, QuantizedTensor(tensor))?.into_any(),
                    exact,
                ),
                Loaded::Float(a) => (name, ty, f32::to_numpy(a, py), true),
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok((version, meta, tensors))
}
