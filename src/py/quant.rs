//! Bindings of `crate::quant`'s affine kernels and its `QuantSpec` / `QuantizedTensor`.
use super::convert::{
    codes_in, codes_out, dtype_str, float_in, int_arg, vec_f64, vec_i64, with_codes, with_float,
    ToNumpy,
};
use super::{detach, to_pyerr, type_error, value_error};
use crate::quant::affine::{self, FakeQuantOp};
use crate::quant::checkpoint::{self, Entry};
use crate::quant::spec::{self, Granularity};
use crate::quant::{Elem, Real};
use half::f16;
use ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::path::PathBuf;

/// A fake-quant result: the array, or `(array, mask)`.
fn fq_out<'py, E: Elem + ToNumpy>(
    py: Python<'py>,
    (out, mask): (ArrayD<E>, Option<ArrayD<bool>>),
) -> PyResult<Bound<'py, PyAny>> {
    let o = E::to_numpy(out, py);
    Ok(match mask {
        Some(m) => (o, bool::to_numpy(m, py)).into_pyobject(py)?.into_any(),
        None => o,
    })
}

/// The arguments of a fake-quant call, turned into a validated op once the shape is known.
enum FqArgs {
    Tensor(f64, i64, i64, i64),
    Channel(Vec<f64>, Vec<i64>, i64, i64, i64),
}

impl FqArgs {
    fn op<C: Real>(&self, shape: &[usize]) -> crate::Result<FakeQuantOp<C>> {
        match self {
            FqArgs::Tensor(s, z, lo, hi) => FakeQuantOp::per_tensor(shape, *s, *z, *lo, *hi),
            FqArgs::Channel(s, z, axis, lo, hi) => {
                FakeQuantOp::per_channel(shape, s, z, *axis, *lo, *hi)
            }
        }
    }
}

/// Runs a fake-quant into a new array, or into `out` (in place when `inplace`, then `x` is `out`).
fn fake_quant<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    args: FqArgs,
    return_mask: bool,
    bf16: bool,
    out: Option<&Bound<'py, PyAny>>,
    inplace: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let Some(out) = out else {
        let x = float_in(x, bf16, "x")?;
        return with_float!(x, |v| {
            let r = detach(py, || args.op(v.shape())?.run(v, return_mask))?;
            fq_out(py, r)
        });
    };
    if bf16 {
        return Err(type_error("out is not supported for bfloat16"));
    }
    if let Ok(o) = out.cast::<PyArrayDyn<f32>>() {
        fq_into(py, x, o, &args, inplace, return_mask)
    } else if let Ok(o) = out.cast::<PyArrayDyn<f64>>() {
        fq_into(py, x, o, &args, inplace, return_mask)
    } else if let Ok(o) = out.cast::<PyArrayDyn<f16>>() {
        fq_into(py, x, o, &args, inplace, return_mask)
    } else {
        Err(type_error(format!(
            "out must be a float32, float16 or float64 array, got {}",
            dtype_str(out)
        )))
    }
}

fn fq_into<'py, E: Elem + numpy::Element>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: &Bound<'py, PyArrayDyn<E>>,
    args: &FqArgs,
    inplace: bool,
    return_mask: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut ow = out
        .try_readwrite()
        .map_err(|e| value_error(format!("out cannot be written: {e}")))?;
    // as_slice_mut also accepts Fortran order, whose memory order is not the C order we write.
    if !out.is_c_contiguous() {
        return Err(value_error("out must be a C-contiguous array"));
    }
    let shape = ow.shape().to_vec();
    let op = args.op::<E::C>(&shape).map_err(to_pyerr)?;
    let mut mask = return_mask.then(|| ArrayD::<bool>::from_elem(IxDyn(&shape), false));
    let os = ow
        .as_slice_mut()
        .map_err(|_| value_error("out must be a C-contiguous array"))?;
    let ms = mask
        .as_mut()
        .map(|m| m.as_slice_mut().expect("fresh arrays are contiguous"));
    if inplace {
        detach(py, || op.run_in_place(os, ms))?;
    } else {
        let xa = x
            .cast::<PyArrayDyn<E>>()
            .map_err(|_| {
                type_error(format!(
                    "out has dtype {}, x has {}",
                    dtype_str(out.as_any()),
                    dtype_str(x)
                ))
            })?
            .try_readonly()
            .map_err(|_| value_error("out overlaps x; pass out=x to work in place"))?;
        let xv = xa.as_array();
        detach(py, || op.run_into(xv, os, ms))?;
    }
    drop(ow);
    let o = out.clone().into_any();
    Ok(match mask {
        Some(m) => (o, bool::to_numpy(m, py)).into_pyobject(py)?.into_any(),
        None => o,
    })
}

#[pyfunction]
#[pyo3(signature = (x, scale, zero_point, quant_min, quant_max, return_mask=false, bf16=false, out=None, inplace=false))]
#[allow(clippy::too_many_arguments)]
pub fn fake_quantize_per_tensor_affine<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scale: f64,
    zero_point: i64,
    quant_min: i64,
    quant_max: i64,
    return_mask: bool,
    bf16: bool,
    out: Option<&Bound<'py, PyAny>>,
    inplace: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let args = FqArgs::Tensor(scale, zero_point, quant_min, quant_max);
    fake_quant(py, x, args, return_mask, bf16, out, inplace)
}

#[pyfunction]
#[pyo3(signature = (x, scale, zero_point, axis, quant_min, quant_max, return_mask=false, bf16=false, out=None, inplace=false))]
#[allow(clippy::too_many_arguments)]
pub fn fake_quantize_per_channel_affine<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scale: &Bound<'py, PyAny>,
    zero_point: &Bound<'py, PyAny>,
    axis: i64,
    quant_min: i64,
    quant_max: i64,
    return_mask: bool,
    bf16: bool,
    out: Option<&Bound<'py, PyAny>>,
    inplace: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let args = FqArgs::Channel(
        vec_f64(scale, "scale")?,
        vec_i64(zero_point, "zero_point")?,
        axis,
        quant_min,
        quant_max,
    );
    fake_quant(py, x, args, return_mask, bf16, out, inplace)
}

#[pyfunction]
pub fn quantize_per_tensor<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scale: f64,
    zero_point: i64,
    quant_min: i64,
    quant_max: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let x = float_in(x, false, "x")?;
    let c = with_float!(x, |v| detach(py, || affine::quantize_per_tensor(
        v, scale, zero_point, quant_min, quant_max
    ))?);
    Ok(codes_out(py, c))
}

#[pyfunction]
pub fn quantize_per_channel<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    zero_points: &Bound<'py, PyAny>,
    axis: i64,
    quant_min: i64,
    quant_max: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let x = float_in(x, false, "x")?;
    let (s, z) = (
        vec_f64(scales, "scales")?,
        vec_i64(zero_points, "zero_points")?,
    );
    let c = with_float!(x, |v| detach(py, || affine::quantize_per_channel(
        v, &s, &z, axis, quant_min, quant_max
    ))?);
    Ok(codes_out(py, c))
}

#[pyfunction]
pub fn dequantize_per_tensor<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    scale: f64,
    zero_point: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let out = with_codes!(codes_in(q)?, |v| detach(py, || {
        affine::dequantize_per_tensor(v, scale, zero_point)
    })?);
    Ok(f32::to_numpy(out, py))
}

#[pyfunction]
pub fn dequantize_per_channel<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    zero_points: &Bound<'py, PyAny>,
    axis: i64,
) -> PyResult<Bound<'py, PyAny>> {
    let (s, z) = (
        vec_f64(scales, "scales")?,
        vec_i64(zero_points, "zero_points")?,
    );
    let out = with_codes!(codes_in(q)?, |v| detach(py, || {
        affine::dequantize_per_channel(v, &s, &z, axis)
    })?);
    Ok(f32::to_numpy(out, py))
}

/// Constructor arguments of a `QuantSpec`, for pickling.
type SpecArgs = (u32, bool, &'static str, i64, Option<usize>);

/// How to quantize: code width, symmetric or not, and the granularity of the scales.
#[pyclass(module = "lowbit", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct QuantSpec(pub(crate) spec::QuantSpec);

#[pymethods]
impl QuantSpec {
    #[new]
    #[pyo3(signature = (bits, symmetric=true, granularity="tensor", axis=0, group_size=None))]
    fn new(
        bits: &Bound<'_, PyAny>,
        symmetric: bool,
        granularity: &str,
        #[pyo3(from_py_with = axis_arg)] axis: i64,
        group_size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let bits = int_arg(bits, "bits")?;
        let group_size = group_size.map(|g| int_arg(g, "group_size")).transpose()?;
        let g: Granularity = granularity.parse().map_err(to_pyerr)?;
        Ok(QuantSpec(
            spec::QuantSpec::new(bits, symmetric, g, axis, group_size).map_err(to_pyerr)?,
        ))
    }
    #[getter]
    fn bits(&self) -> u32 {
        self.0.bits
    }
    #[getter]
    fn symmetric(&self) -> bool {
        self.0.symmetric
    }
    #[getter]
    fn granularity(&self) -> &'static str {
        self.0.granularity.as_str()
    }
    #[getter]
    fn axis(&self) -> i64 {
        self.0.axis
    }
    #[getter]
    fn group_size(&self) -> Option<usize> {
        self.0.group_size
    }
    #[getter]
    fn quant_min(&self) -> i32 {
        self.0.range().min
    }
    #[getter]
    fn quant_max(&self) -> i32 {
        self.0.range().max
    }
    fn __repr__(&self) -> String {
        let s = &self.0;
        let g = s.group_size.map_or("None".to_string(), |g| g.to_string());
        format!(
            "QuantSpec(bits={}, symmetric={}, granularity='{}', axis={}, group_size={g})",
            s.bits,
            if s.symmetric { "True" } else { "False" },
            s.granularity.as_str(),
            s.axis
        )
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, SpecArgs)> {
        let s = slf.get().0;
        Ok((
            slf.get_type().into_any(),
            (
                s.bits,
                s.symmetric,
                s.granularity.as_str(),
                s.axis,
                s.group_size,
            ),
        ))
    }
}

fn axis_arg(x: &Bound<'_, PyAny>) -> PyResult<i64> {
    int_arg(x, "axis")
}

/// Packed codes with their scales and zero points.
#[pyclass(module = "lowbit", frozen)]
pub struct QuantizedTensor(pub(crate) spec::QuantizedTensor);

#[pymethods]
impl QuantizedTensor {
    #[getter]
    fn spec(&self) -> QuantSpec {
        QuantSpec(self.0.spec)
    }
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.0.shape.clone()
    }
    /// Packed codes (a fresh uint8 array; `code - quant_min` at `bits` bits each, LSB first).
    #[getter]
    fn codes<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        ndarray::Array1::from(self.0.codes.clone())
            .into_dyn()
            .into_pyarray(py)
            .into_any()
    }
    #[getter]
    fn scales<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.0.scales.clone().into_pyarray(py).into_any()
    }
    #[getter]
    fn zero_points<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.0.zero_points.clone().into_pyarray(py).into_any()
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.0.nbytes()
    }
    fn int_repr<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let c = detach(py, || self.0.int_codes())?;
        Ok(codes_out(py, c))
    }
    fn dequantize<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let x = detach(py, || self.0.dequantize())?;
        Ok(f32::to_numpy(x, py))
    }
    #[pyo3(signature = (path, name="tensor"))]
    fn save(&self, py: Python<'_>, path: PathBuf, name: &str) -> PyResult<()> {
        let e = vec![(
            name.to_string(),
            Entry::Quantized {
                tensor: self.0.clone(),
                dtype: safetensors::Dtype::F32,
            },
        )];
        detach(py, || checkpoint::save(&path, &e, &Default::default()))
    }
    fn __repr__(&self) -> String {
        format!(
            "QuantizedTensor(shape={:?}, bits={}, granularity='{}', nbytes={})",
            self.0.shape,
            self.0.spec.bits,
            self.0.spec.granularity.as_str(),
            self.0.nbytes()
        )
    }
}

/// `quantize(x, spec, scales=None, zero_points=None)`: the core of `lowbit.quantize`.
#[pyfunction]
#[pyo3(signature = (x, spec, scales=None, zero_points=None))]
pub fn quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    spec: &QuantSpec,
    scales: Option<PyReadonlyArrayDyn<'py, f32>>,
    zero_points: Option<PyReadonlyArrayDyn<'py, i32>>,
) -> PyResult<QuantizedTensor> {
    let x = float_in(x, false, "x")?;
    let qp = match (scales, zero_points) {
        (Some(s), Some(z)) => Some((s.as_array().to_owned(), z.as_array().to_owned())),
        (None, None) => None,
        _ => return Err(value_error("give both scales and zero_points, or neither")),
    };
    let sp = spec.0;
    let q = with_float!(x, |v| detach(py, || spec::quantize(v, sp, qp))?);
    Ok(QuantizedTensor(q))
}

/// The elementwise gradients `(dx, dscale, dzero_point)` of learnable fake-quant (LSQ) for
/// C-contiguous float32 `x` and `dy`, before the sums over each channel (torch takes those).
#[pyfunction]
#[pyo3(signature = (x, dy, scale, zero_point, axis, quant_min, quant_max, grad_factor, fused))]
#[allow(clippy::too_many_arguments)]
pub fn fake_quantize_learnable_grad<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    dy: PyReadonlyArrayDyn<'py, f32>,
    scale: Vec<f32>,
    zero_point: Vec<f32>,
    axis: Option<usize>,
    quant_min: i64,
    quant_max: i64,
    grad_factor: f32,
    fused: bool,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let shape = x.shape().to_vec();
    if dy.shape() != shape.as_slice() {
        return Err(value_error(format!(
            "dy has shape {:?}, x has {shape:?}",
            dy.shape()
        )));
    }
    let (xs, dys) = match (x.as_slice(), dy.as_slice()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => return Err(value_error("x and dy must be C-contiguous")),
    };
    let k = affine::LearnableGrad::new(
        &shape,
        axis,
        &scale,
        &zero_point,
        quant_min,
        quant_max,
        grad_factor,
        fused,
    )
    .map_err(to_pyerr)?;
    let (dx, ds, dz) = detach(py, || k.run(xs, dys))?;
    let arr = |v: Vec<f32>| -> PyResult<Bound<'py, PyAny>> {
        let a = ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| value_error(e.to_string()))?;
        Ok(a.into_pyarray(py).into_any())
    };
    Ok((arr(dx)?, arr(ds)?, arr(dz)?))
}
