//! Every conversion between Python objects and the core's types: float and code arrays in
//! (zero-copy views), owned arrays out (no copy), integer, shape and sequence arguments. A value
//! of the wrong kind becomes `LowbitTypeError`, one out of range `LowbitValueError`.
use super::{type_error, value_error};
use crate::quant::affine::Codes;
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::exceptions::PyOverflowError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

/// The dtype of an array argument, or its Python type, for error messages.
pub(crate) fn dtype_str(x: &Bound<'_, PyAny>) -> String {
    x.getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| type_name(x))
}

fn type_name(x: &Bound<'_, PyAny>) -> String {
    x.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// A float input array; bfloat16 arrives as an int16 view with `bf16=True`.
pub(crate) enum FloatIn<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    BF16(PyReadonlyArrayDyn<'py, i16>),
}

pub(crate) fn float_in<'py>(
    x: &Bound<'py, PyAny>,
    bf16: bool,
    what: &str,
) -> PyResult<FloatIn<'py>> {
    if bf16 {
        if let Ok(a) = x.cast::<PyArrayDyn<i16>>() {
            return Ok(FloatIn::BF16(a.try_readonly()?));
        }
    } else if let Ok(a) = x.cast::<PyArrayDyn<f32>>() {
        return Ok(FloatIn::F32(a.try_readonly()?));
    } else if let Ok(a) = x.cast::<PyArrayDyn<f64>>() {
        return Ok(FloatIn::F64(a.try_readonly()?));
    } else if let Ok(a) = x.cast::<PyArrayDyn<f16>>() {
        return Ok(FloatIn::F16(a.try_readonly()?));
    }
    Err(type_error(format!(
        "{what} must be a float32, float16 or float64 array (bfloat16 through lowbit.torch), got {}",
        dtype_str(x)
    )))
}

/// Reinterprets int16 bits as bfloat16 in place (same size and alignment).
pub(crate) fn bf16_view<'a>(a: ArrayViewD<'a, i16>) -> ArrayViewD<'a, bf16> {
    // SAFETY: bf16 is a transparent u16 with the size and alignment of i16; the view keeps
    // the lifetime, shape and strides of `a`.
    let raw = a.raw_view().cast::<bf16>();
    unsafe { raw.deref_into_view() }
}

/// Runs `$body` with `$v` bound to the `ArrayViewD` of any `FloatIn` (one instantiation of a
/// generic kernel per dtype).
macro_rules! with_float {
    ($x:expr, |$v:ident| $body:expr) => {
        match $x {
            $crate::py::convert::FloatIn::F32(a) => {
                let $v = a.as_array();
                $body
            }
            $crate::py::convert::FloatIn::F64(a) => {
                let $v = a.as_array();
                $body
            }
            $crate::py::convert::FloatIn::F16(a) => {
                let $v = a.as_array();
                $body
            }
            $crate::py::convert::FloatIn::BF16(a) => {
                let $v = $crate::py::convert::bf16_view(a.as_array());
                $body
            }
        }
    };
}
pub(crate) use with_float;

/// An input array of quantized codes.
pub(crate) enum CodesIn<'py> {
    I8(PyReadonlyArrayDyn<'py, i8>),
    U8(PyReadonlyArrayDyn<'py, u8>),
}

pub(crate) fn codes_in<'py>(q: &Bound<'py, PyAny>) -> PyResult<CodesIn<'py>> {
    if let Ok(a) = q.cast::<PyArrayDyn<i8>>() {
        Ok(CodesIn::I8(a.try_readonly()?))
    } else if let Ok(a) = q.cast::<PyArrayDyn<u8>>() {
        Ok(CodesIn::U8(a.try_readonly()?))
    } else {
        Err(type_error(format!(
            "q must be an int8 or uint8 array of codes, got {}",
            dtype_str(q)
        )))
    }
}

/// Runs `$body` with `$v` bound to the `ArrayViewD` of any `CodesIn`.
macro_rules! with_codes {
    ($x:expr, |$v:ident| $body:expr) => {
        match $x {
            $crate::py::convert::CodesIn::I8(a) => {
                let $v = a.as_array();
                $body
            }
            $crate::py::convert::CodesIn::U8(a) => {
                let $v = a.as_array();
                $body
            }
        }
    };
}
pub(crate) use with_codes;

/// Hands an owned array to NumPy without copying; bfloat16 goes back as int16 bits.
pub(crate) trait ToNumpy: Sized {
    fn to_numpy(a: ArrayD<Self>, py: Python<'_>) -> Bound<'_, PyAny>;
}
macro_rules! to_numpy_direct {
    ($($t:ty),*) => {$(
        impl ToNumpy for $t {
            fn to_numpy(a: ArrayD<$t>, py: Python<'_>) -> Bound<'_, PyAny> {
                a.into_pyarray(py).into_any()
            }
        }
    )*};
}
to_numpy_direct!(f32, f64, f16, bool, i8, u8);
impl ToNumpy for bf16 {
    fn to_numpy(a: ArrayD<bf16>, py: Python<'_>) -> Bound<'_, PyAny> {
        let dim = a.raw_dim();
        let (v, _) = a.into_raw_vec_and_offset();
        let bits: Vec<i16> = bytemuck::allocation::cast_vec(v);
        ArrayD::from_shape_vec(dim, bits)
            .expect("same shape")
            .into_pyarray(py)
            .into_any()
    }
}

/// Codes as an int8 or uint8 NumPy array, without a copy.
pub(crate) fn codes_out(py: Python<'_>, c: Codes) -> Bound<'_, PyAny> {
    match c {
        Codes::I8(a) => i8::to_numpy(a, py),
        Codes::U8(a) => u8::to_numpy(a, py),
    }
}

pub(crate) fn vec_f64(x: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<f64>> {
    x.extract::<Vec<f64>>().map_err(|_| {
        type_error(format!(
            "{what} must be a 1-D sequence of floats, got {}",
            dtype_str(x)
        ))
    })
}

pub(crate) fn vec_i64(x: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    x.extract::<Vec<i64>>().map_err(|_| {
        type_error(format!(
            "{what} must be a 1-D sequence of integers, got {}",
            dtype_str(x)
        ))
    })
}

/// An integer argument named `what` (a Python int, a NumPy integer, anything with `__index__`).
/// Out of `T`'s range it raises `LowbitValueError`, where pyo3 alone would raise `OverflowError`,
/// which callers catching `ValueError` miss.
pub(crate) fn int_arg<'py, T>(x: &Bound<'py, PyAny>, what: &str) -> PyResult<T>
where
    T: pyo3::conversion::FromPyObjectOwned<'py>,
{
    x.extract::<T>().map_err(|e| {
        if e.into().is_instance_of::<PyOverflowError>(x.py()) {
            value_error(format!("{what} is out of range, got {x}"))
        } else {
            type_error(format!("{what} must be an integer, got {}", type_name(x)))
        }
    })
}

/// A shape argument named `what`: a sequence of non-negative integers (not a string).
pub(crate) fn shape_arg(x: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    if x.is_instance_of::<PyString>() || x.is_instance_of::<PyDict>() {
        return Err(type_error(format!(
            "{what} must be a sequence of integers, got {}",
            type_name(x)
        )));
    }
    x.try_iter()
        .map_err(|_| type_error(format!("{what} must be a sequence of integers, got {x}")))?
        .map(|d| int_arg::<u64>(&d?, what))
        .collect()
}

/// A GGUF metadata value as Python: int, float, bool, str, or a (nested) list of them.
pub(crate) fn gguf_value<'py>(
    py: Python<'py>,
    v: &crate::gguf::Value,
) -> PyResult<Bound<'py, PyAny>> {
    use crate::gguf::Value as V;
    Ok(match v {
        V::U8(x) => x.into_pyobject(py)?.into_any(),
        V::I8(x) => x.into_pyobject(py)?.into_any(),
        V::U16(x) => x.into_pyobject(py)?.into_any(),
        V::I16(x) => x.into_pyobject(py)?.into_any(),
        V::U32(x) => x.into_pyobject(py)?.into_any(),
        V::I32(x) => x.into_pyobject(py)?.into_any(),
        V::U64(x) => x.into_pyobject(py)?.into_any(),
        V::I64(x) => x.into_pyobject(py)?.into_any(),
        V::F32(x) => x.into_pyobject(py)?.into_any(),
        V::F64(x) => x.into_pyobject(py)?.into_any(),
        V::Bool(x) => pyo3::types::PyBool::new(py, *x).to_owned().into_any(),
        V::Str(x) => PyString::new(py, x).into_any(),
        V::Array(a) => gguf_array(py, a)?,
    })
}

fn gguf_array<'py>(py: Python<'py>, a: &crate::gguf::Array) -> PyResult<Bound<'py, PyAny>> {
    use crate::gguf::Array as A;
    use pyo3::types::PyList;
    Ok(match a {
        A::U8(v) => PyList::new(py, v)?.into_any(),
        A::I8(v) => PyList::new(py, v)?.into_any(),
        A::U16(v) => PyList::new(py, v)?.into_any(),
        A::I16(v) => PyList::new(py, v)?.into_any(),
        A::U32(v) => PyList::new(py, v)?.into_any(),
        A::I32(v) => PyList::new(py, v)?.into_any(),
        A::U64(v) => PyList::new(py, v)?.into_any(),
        A::I64(v) => PyList::new(py, v)?.into_any(),
        A::F32(v) => PyList::new(py, v)?.into_any(),
        A::F64(v) => PyList::new(py, v)?.into_any(),
        A::Bool(v) => PyList::new(py, v)?.into_any(),
        A::Str(v) => PyList::new(py, v)?.into_any(),
        A::Array(v) => {
            let items = v
                .iter()
                .map(|x| gguf_array(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
    })
}

/// Bytes as a uint8 NumPy array of `shape` (their count must match).
pub(crate) fn bytes_to_numpy<'py>(
    py: Python<'py>,
    bytes: Vec<u8>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let a = ArrayD::from_shape_vec(ndarray::IxDyn(shape), bytes)
        .map_err(|e| value_error(e.to_string()))?;
    Ok(u8::to_numpy(a, py))
}
