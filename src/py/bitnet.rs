//! Bindings of `crate::bitnet`. `lowbit.bitnet` checks dtypes and shapes first.
use super::detach;
use crate::bitnet::aten_sum::SumOrder;
use crate::bitnet::binary::SignMatrix;
use crate::bitnet::{intgemm, linear, quant};
use ndarray::{Array1, Array2};
use numpy::{IntoPyArray, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

type Arrays<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

fn pair<'py>(py: Python<'py>, (a, s): (Array2<i8>, Vec<f32>)) -> Arrays<'py> {
    (
        a.into_pyarray(py).into_any(),
        Array1::from(s).into_pyarray(py).into_any(),
    )
}

/// `threads`: torch's thread count, which decides the order it adds the mean in (`bitnet::aten_sum`).
#[pyfunction]
#[pyo3(signature = (w, per_channel, threads=1))]
pub fn ternary_quantize<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    per_channel: bool,
    threads: usize,
) -> PyResult<Arrays<'py>> {
    let v = w.as_array();
    let order = SumOrder {
        threads,
        ..Default::default()
    };
    Ok(pair(
        py,
        detach(py, || quant::ternary_quantize(v, per_channel, order))?,
    ))
}

#[pyfunction]
pub fn activation_quant<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    bits: u32,
) -> PyResult<Arrays<'py>> {
    let v = x.as_array();
    Ok(pair(py, detach(py, || quant::activation_quant(v, bits))?))
}

#[pyfunction]
pub fn binary_quantize<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    center: bool,
) -> PyResult<Arrays<'py>> {
    let v = w.as_array();
    Ok(pair(py, detach(py, || quant::binary_quantize(v, center))?))
}

/// Signs of a float matrix packed one bit per value (sign(0) = +1).
#[pyclass(module = "lowbit._lowbit", frozen)]
pub struct PackedSigns(SignMatrix);

#[pymethods]
impl PackedSigns {
    #[new]
    fn new(py: Python<'_>, x: PyReadonlyArray2<'_, f32>) -> PyResult<Self> {
        let v = x.as_array();
        Ok(PackedSigns(detach(py, || SignMatrix::from_floats(v))?))
    }
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.0.rows, self.0.k)
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.0.nbytes()
    }
}

/// `sign(a) @ sign(b).T` in int32 by XNOR + popcount.
#[pyfunction]
pub fn binary_matmul_packed<'py>(
    py: Python<'py>,
    a: &PackedSigns,
    b: &PackedSigns,
) -> PyResult<Bound<'py, PyAny>> {
    Ok(detach(py, || a.0.matmul(&b.0))?.into_pyarray(py).into_any())
}

/// A ternary linear layer: packed 2-bit weights, per-row int8 activations, integer GEMM.
#[pyclass(module = "lowbit._lowbit", frozen)]
pub struct TernaryLinear(linear::TernaryLinear);

#[pymethods]
impl TernaryLinear {
    #[new]
    #[pyo3(signature = (codes, scale, bias=None))]
    fn new(
        py: Python<'_>,
        codes: PyReadonlyArray2<'_, i8>,
        scale: PyReadonlyArray1<'_, f32>,
        bias: Option<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<Self> {
        let (c, s) = (codes.as_array(), scale.as_array().to_vec());
        let b = bias.map(|b| b.as_array().to_vec());
        detach(py, || linear::TernaryLinear::new(c, s, b)).map(TernaryLinear)
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.0.w.k
    }
    #[getter]
    fn out_features(&self) -> usize {
        self.0.w.n
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.0.w.nbytes()
    }
    #[getter]
    fn codes<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        self.0.w.codes().into_pyarray(py).into_any()
    }

    /// Integer product `q @ codes.T` for int8 activations.
    fn int_matmul<'py>(
        &self,
        py: Python<'py>,
        q: PyReadonlyArray2<'py, i8>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let v = q.as_array();
        Ok(detach(py, || self.0.w.matmul(v))?
            .into_pyarray(py)
            .into_any())
    }

    /// `(q_x @ codes.T) * (scale_w / s_x) + bias`, computed in float64 and rounded to float32.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let v = x.as_array();
        Ok(detach(py, || self.0.forward(v))?
            .into_pyarray(py)
            .into_any())
    }
}

/// A linear layer on quantized weights as stored: int8 activations per row, the W8A8 / W4A8
/// integer GEMM.
#[pyclass(module = "lowbit._lowbit", frozen)]
pub struct IntLinear(intgemm::IntLinear);

#[pymethods]
impl IntLinear {
    #[new]
    #[pyo3(signature = (weight, bias=None))]
    fn new(
        py: Python<'_>,
        weight: &super::quant::QuantizedTensor,
        bias: Option<PyReadonlyArray1<'_, f32>>,
    ) -> PyResult<Self> {
        let b = bias.map(|b| b.as_array().to_vec());
        let w = &weight.0;
        detach(py, || intgemm::IntLinear::new(w, b)).map(IntLinear)
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.0.w.k
    }
    #[getter]
    fn out_features(&self) -> usize {
        self.0.w.n
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.0.w.nbytes()
    }

    /// `q_x @ dequantized(w).T / s_x + bias` on the chosen kernel path ("avx512vnni", "avxvnni",
    /// "avx2", "portable"; the fastest allowed when None).
    #[pyo3(signature = (x, path=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
        path: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let path = match path {
            None => intgemm::Path::best(),
            Some(name) => intgemm::Path::from_name(name).map_err(super::to_pyerr)?,
        };
        let v = x.as_array();
        Ok(detach(py, || self.0.forward_on(v, None, path))?
            .into_pyarray(py)
            .into_any())
    }
}

/// `(instruction, MAC/s)` of one thread's tight int8 multiply-accumulate loop (the benches'
/// GEMM ceiling); None on the portable path.
#[pyfunction]
pub fn intgemm_peak(py: Python<'_>, seconds: f64) -> PyResult<Option<(&'static str, f64)>> {
    detach(py, || Ok(intgemm::peak_mac_rate(seconds)))
}

/// The integer GEMM paths this machine can run, fastest last.
#[pyfunction]
pub fn intgemm_paths() -> Vec<&'static str> {
    intgemm::Path::available()
        .into_iter()
        .map(|p| p.name())
        .collect()
}

/// The kernel path in use ("avx2" or "scalar"), chosen by the CPU and `LOWBIT_ISA`.
#[pyfunction]
pub fn bitnet_kernel() -> &'static str {
    crate::bitnet::kernel_name()
}

#[pyfunction]
pub fn pack_rows<'py>(
    py: Python<'py>,
    codes: numpy::PyReadonlyArray2<'py, u8>,
    bits: u32,
) -> PyResult<Bound<'py, PyAny>> {
    let v = codes.as_array();
    Ok(detach(py, || crate::bitnet::pack::pack_rows(v, bits))?
        .into_pyarray(py)
        .into_any())
}

#[pyfunction]
pub fn unpack_rows<'py>(
    py: Python<'py>,
    packed: numpy::PyReadonlyArray2<'py, u8>,
    bits: u32,
    k: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let v = packed.as_array();
    Ok(detach(py, || crate::bitnet::pack::unpack_rows(v, bits, k))?
        .into_pyarray(py)
        .into_any())
}

#[pyfunction]
pub fn pack_tq1<'py>(
    py: Python<'py>,
    codes: numpy::PyReadonlyArray2<'py, i8>,
) -> PyResult<Bound<'py, PyAny>> {
    let v = codes.as_array();
    Ok(detach(py, || crate::bitnet::pack::pack_tq1(v))?
        .into_pyarray(py)
        .into_any())
}

#[pyfunction]
pub fn unpack_tq1<'py>(
    py: Python<'py>,
    packed: numpy::PyReadonlyArray2<'py, u8>,
    k: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let v = packed.as_array();
    Ok(detach(py, || crate::bitnet::pack::unpack_tq1(v, k))?
        .into_pyarray(py)
        .into_any())
}
