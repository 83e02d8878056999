//! The Python module `lowbit._lowbit`: the only code that touches pyo3 and numpy.
use crate::Error;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use std::panic::AssertUnwindSafe;

/// Rust-side allocations of the extension (tensors handed to NumPy included: they are freed by
/// their Rust owner). See `Cargo.toml` for why.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bitnet;
mod calib;
mod checkpoint;
mod convert;
mod gguf;
mod nas;
mod ptq;
mod quant;
mod runtime;

pyo3::create_exception!(
    lowbit,
    LowbitError,
    PyException,
    "Base class of every error lowbit raises."
);

static VALUE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static TYPE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static IO_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static FORMAT_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// Creates `class name(LowbitError, base)` in module `lowbit`.
fn subclass<'py>(
    py: Python<'py>,
    name: &str,
    base: &Bound<'py, PyType>,
    doc: &str,
) -> PyResult<Bound<'py, PyType>> {
    let bases = PyTuple::new(py, [py.get_type::<LowbitError>(), base.clone()])?;
    let ns = PyDict::new(py);
    ns.set_item("__module__", "lowbit")?;
    ns.set_item("__doc__", doc)?;
    let ty = py.get_type::<PyType>().call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?)
}

fn err_type<'py>(py: Python<'py>, cell: &'static PyOnceLock<Py<PyType>>) -> Bound<'py, PyType> {
    cell.get(py)
        .expect("exception classes are created at import")
        .bind(py)
        .clone()
}

/// Converts a core error into the matching Python exception.
pub(crate) fn to_pyerr(e: Error) -> PyErr {
    Python::attach(|py| {
        let cell = match &e {
            Error::Value(_) => &VALUE_ERROR,
            Error::Type(_) => &TYPE_ERROR,
            Error::Io { .. } => &IO_ERROR,
            Error::Format(_) => &FORMAT_ERROR,
        };
        PyErr::from_type(err_type(py, cell), e.to_string())
    })
}

pub(crate) fn value_error(msg: impl Into<String>) -> PyErr {
    to_pyerr(Error::Value(msg.into()))
}

pub(crate) fn type_error(msg: impl Into<String>) -> PyErr {
    to_pyerr(Error::Type(msg.into()))
}

/// Runs a core call with the GIL released, where its parallel loops have threads (also in a
/// forked child: `crate::pool`); a core error becomes its Python exception and a panic (a lowbit
/// bug) becomes `LowbitError` instead of `PanicException`.
pub(crate) fn detach<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    detach_with(py, || crate::pool::run(f))
}

/// `detach` for a call on state behind `lock`: the lock is taken on the calling thread, with
/// the GIL released, before the work enters a pool (see `crate::pool::run`).
pub(crate) fn detach_locked<I: Send, T: Send>(
    py: Python<'_>,
    lock: &std::sync::Mutex<I>,
    f: impl FnOnce(&mut I) -> crate::Result<T> + Send,
) -> PyResult<T> {
    detach_with(py, || {
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let state: &mut I = &mut guard;
        crate::pool::run(|| f(state))
    })
}

fn detach_with<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| std::panic::catch_unwind(AssertUnwindSafe(f))) {
        Ok(r) => r.map_err(to_pyerr),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(LowbitError::new_err(format!(
                "internal error in lowbit (please report): {msg}"
            )))
        }
    }
}

/// `detach`, with `f` run on a rayon worker: the parallel loops inside it are pushed onto that
/// worker's deque instead of each being injected into the pool from outside and waited for (a
/// cross-thread wake-up per loop, which dominates a small model's forward pass). Only for `f`
/// that holds no lock across a parallel loop: a worker waiting inside one can steal another
/// call's job, and if that job wants the same lock the worker deadlocks on itself.
pub(crate) fn detach_on_pool<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    detach(py, || rayon::scope(|_| f()))
}

/// `lowbit.show_config()`'s facts: (section, key, value) rows.
#[pyfunction]
fn build_config() -> Vec<(String, String, String)> {
    let mut rows = crate::config::rows();
    // The allocator is the extension's own (`ALLOC` above), not the core's.
    let at = rows.iter().position(|r| r.0 == "cpu").unwrap_or(rows.len());
    rows.insert(at, ("build".into(), "allocator".into(), "mimalloc".into()));
    rows
}

#[pymodule]
mod _lowbit {
    use super::*;

    #[pymodule_export]
    use super::LowbitError;

    #[pymodule_export]
    use super::build_config;

    #[pymodule_export]
    use super::calib::Observer;

    #[pymodule_export]
    use super::bitnet::{
        activation_quant, binary_matmul_packed, binary_quantize, bitnet_kernel, intgemm_paths,
        intgemm_peak, pack_rows, pack_tq1, ternary_quantize, unpack_rows, unpack_tq1, IntLinear,
        PackedSigns, TernaryLinear,
    };

    #[pymodule_export]
    use super::runtime::{BertCore, MultiTaskCore};

    #[pymodule_export]
    use super::nas::{builtin_devices, estimate_json, fit_device, DeviceProfile, Graph, SpaceCore};

    #[pymodule_export]
    use super::quant::{
        dequantize_per_channel, dequantize_per_tensor, fake_quantize_learnable_grad,
        fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine, quantize,
        quantize_per_channel, quantize_per_tensor, QuantSpec, QuantizedTensor,
    };

    #[pymodule_export]
    use super::ptq::{awq_search, gptq, hadamard_conjugate, hadamard_rotate, hqq, output_error};

    #[pymodule_export]
    use super::gguf::{gguf_dequantize, gguf_quantize, load_gguf};

    #[pymodule_export]
    use super::checkpoint::{
        checkpoint_metadata, dequantize_checkpoint, load_quantized, quantize_checkpoint,
        save_checkpoint,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        let _ = pyo3_log::try_init();
        for (cell, name, base, doc) in [
            (
                &VALUE_ERROR,
                "LowbitValueError",
                py.get_type::<pyo3::exceptions::PyValueError>(),
                "A bad shape, value or range (also a ValueError).",
            ),
            (
                &TYPE_ERROR,
                "LowbitTypeError",
                py.get_type::<pyo3::exceptions::PyTypeError>(),
                "A wrong dtype or argument type (also a TypeError).",
            ),
            (
                &IO_ERROR,
                "LowbitIOError",
                py.get_type::<pyo3::exceptions::PyOSError>(),
                "A file could not be read or written (also an OSError).",
            ),
            (
                &FORMAT_ERROR,
                "LowbitFormatError",
                py.get_type::<pyo3::exceptions::PyValueError>(),
                "A corrupt, truncated or foreign file (also a ValueError).",
            ),
        ] {
            let ty = match cell.get(py) {
                Some(t) => t.bind(py).clone(),
                None => {
                    let t = subclass(py, name, &base, doc)?;
                    let _ = cell.set(py, t.clone().unbind());
                    t
                }
            };
            m.add(name, ty)?;
        }
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
