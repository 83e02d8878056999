//! Bindings of `crate::runtime`. `lowbit.runtime` converts inputs and documents the API.
use super::{detach, detach_on_pool};
use crate::runtime::layers::WeightMode;
use crate::runtime::{bert, multitask};
use crate::runtime::{ce, Record};
use candle_core::Tensor;
use ndarray::ArrayD;
use numpy::{IntoPyArray, PyReadonlyArray2, PyReadonlyArray4};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// A float32 candle tensor as an ndarray of the same shape (one copy).
fn to_array(t: &Tensor) -> crate::Result<ArrayD<f32>> {
    let v = t
        .flatten_all()
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(ce)?;
    Ok(ArrayD::from_shape_vec(t.dims().to_vec(), v).expect("dims match"))
}

fn record_dict<'py>(py: Python<'py>, rec: Record) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, t) in rec {
        let arr = to_array(&t).map_err(super::to_pyerr)?;
        d.set_item(name, arr.into_pyarray(py))?;
    }
    Ok(d)
}

/// Runs a model's forward with the GIL released, recording its layers when asked: the output
/// as an array and, with `record`, the layers by name.
fn recorded<'py>(
    py: Python<'py>,
    record: bool,
    forward: impl FnOnce(Option<&mut Record>) -> crate::Result<Tensor> + Send,
) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyDict>>)> {
    let (out, rec) = detach_on_pool(py, || {
        let mut rec = Record::new();
        let y = forward(record.then_some(&mut rec))?;
        Ok((to_array(&y)?, rec))
    })?;
    let rec = if record {
        Some(record_dict(py, rec)?)
    } else {
        None
    };
    Ok((out.into_pyarray(py).into_any(), rec))
}

/// The BERT encoder of the Rust runtime (see `lowbit.runtime.BertEncoder`).
#[pyclass(module = "lowbit.runtime", frozen)]
pub struct BertCore(bert::BertEncoder);

#[pymethods]
impl BertCore {
    #[staticmethod]
    #[pyo3(signature = (path, weights, act_bits=None))]
    fn load(py: Python<'_>, path: PathBuf, weights: &str, act_bits: Option<u32>) -> PyResult<Self> {
        let mode: WeightMode = weights.parse().map_err(super::to_pyerr)?;
        detach(py, || bert::BertEncoder::load(&path, mode, act_bits)).map(BertCore)
    }

    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = &self.0.config;
        let d = PyDict::new(py);
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("num_hidden_layers", c.num_hidden_layers)?;
        d.set_item("num_attention_heads", c.num_attention_heads)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("hidden_act", &c.hidden_act)?;
        d.set_item("max_position_embeddings", c.max_position_embeddings)?;
        d.set_item("type_vocab_size", c.type_vocab_size)?;
        d.set_item("layer_norm_eps", c.layer_norm_eps)?;
        Ok(d)
    }

    #[pyo3(signature = (input_ids, attention_mask, token_type_ids=None, record=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: PyReadonlyArray2<'py, i64>,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
        record: bool,
    ) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyDict>>)> {
        let (ids, mask) = (input_ids.as_array(), attention_mask.as_array());
        let types = token_type_ids.as_ref().map(|t| t.as_array());
        recorded(py, record, |rec| self.0.forward(ids, mask, types, rec))
    }

    #[pyo3(signature = (input_ids, attention_mask, token_type_ids=None))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: PyReadonlyArray2<'py, i64>,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, mask) = (input_ids.as_array(), attention_mask.as_array());
        let types = token_type_ids.as_ref().map(|t| t.as_array());
        let e = detach_on_pool(py, || self.0.embed(ids, mask, types))?;
        Ok(e.into_pyarray(py).into_any())
    }
}

/// The multi-task model of the Rust runtime (see `lowbit.runtime.MultiTaskModel`).
#[pyclass(module = "lowbit.runtime", frozen)]
pub struct MultiTaskCore(multitask::MultiTaskModel);

type Images<'py> = Option<PyReadonlyArray4<'py, f32>>;
type Ids<'py> = Option<PyReadonlyArray2<'py, i64>>;

#[pymethods]
impl MultiTaskCore {
    #[staticmethod]
    #[pyo3(signature = (path, weights, act_bits=None))]
    fn load(py: Python<'_>, path: PathBuf, weights: &str, act_bits: Option<u32>) -> PyResult<Self> {
        let mode: WeightMode = weights.parse().map_err(super::to_pyerr)?;
        detach(py, || {
            multitask::MultiTaskModel::load(&path, mode, act_bits)
        })
        .map(MultiTaskCore)
    }

    /// `MultiTaskConfig.to_json()` as the file stores it.
    #[getter]
    fn config_json(&self) -> &str {
        &self.0.config_json
    }

    #[getter]
    fn logit_scale(&self) -> f32 {
        self.0.logit_scale
    }

    #[pyo3(signature = (task, images=None, ids=None, mask=None, record=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        task: &str,
        images: Images<'py>,
        ids: Ids<'py>,
        mask: Ids<'py>,
        record: bool,
    ) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyDict>>)> {
        let task: multitask::Task = task.parse().map_err(super::to_pyerr)?;
        let images = images.as_ref().map(|a| a.as_array());
        let (ids, mask) = (
            ids.as_ref().map(|a| a.as_array()),
            mask.as_ref().map(|a| a.as_array()),
        );
        recorded(py, record, |rec| {
            self.0.forward(task, images, ids, mask, rec)
        })
    }

    /// Caption token ids per image (without `[BOS]`).
    fn caption(
        &self,
        py: Python<'_>,
        images: PyReadonlyArray4<'_, f32>,
        max_len: usize,
        beam: usize,
    ) -> PyResult<Vec<Vec<i64>>> {
        let images = images.as_array();
        detach_on_pool(py, || {
            let tokens = self.0.image_tokens(images, None)?;
            self.0.caption(&tokens, max_len, beam)
        })
    }

    /// Greedy CTC class indices per image (blanks dropped, repeats merged).
    fn ocr(&self, py: Python<'_>, images: PyReadonlyArray4<'_, f32>) -> PyResult<Vec<Vec<usize>>> {
        let images = images.as_array();
        detach_on_pool(py, || {
            let tokens = self.0.image_tokens(images, None)?;
            multitask::ctc_greedy(&self.0.ocr_logits(&tokens, None)?)
        })
    }
}
