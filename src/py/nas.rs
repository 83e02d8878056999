//! Bindings of `crate::nas`. `lowbit.nas` adds the PyTorch capture, measurement and search.
use super::convert::{int_arg, shape_arg};
use super::{detach, type_error, value_error};
use crate::nas::{cost, device, fit, graph, space};
use numpy::{IntoPyArray, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// An op graph (see `lowbit.nas.Graph`).
#[pyclass(module = "lowbit.nas", frozen)]
pub struct Graph(pub(crate) graph::Graph);

#[pymethods]
impl Graph {
    #[staticmethod]
    fn from_json(py: Python<'_>, text: &str) -> PyResult<Self> {
        Ok(Graph(detach(py, || graph::Graph::from_json(text))?))
    }

    /// A graph from layer descriptions with shape inference; `inputs` maps names to shapes.
    ///
    /// Each layer is a dict with "op", an optional "name" (default: op + index; the layer's
    /// output tensor takes this name), optional "inputs" (tensor names; default: the previous
    /// layer's output, or the last input for the first layer) and the op's attributes:
    /// conv2d (out_channels, kernel, stride=1, padding=kernel//2, groups=1, bias=True),
    /// linear (out_features, in_features optional check, bias=True), matmul (2 inputs),
    /// attention (inputs q, k, v shaped (batch, heads, seq, dim)), layernorm, batchnorm,
    /// groupnorm, rmsnorm, relu / relu6 / gelu / silu / sigmoid / tanh / hardswish /
    /// hardsigmoid, softmax, add / mul / sub / div (2 inputs, broadcasting), maxpool / avgpool
    /// (kernel, stride=kernel, padding=0), global_avgpool, flatten, reshape (shape), embedding
    /// (num_embeddings, dim), concat (axis=1). Unknown ops, shape mismatches and reads of
    /// tensors not defined yet raise LowbitValueError.
    #[staticmethod]
    fn from_layers(
        py: Python<'_>,
        inputs: &Bound<'_, pyo3::types::PyDict>,
        layers: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let inputs: Vec<(String, Vec<u64>)> = inputs
            .iter()
            .map(|(k, v)| {
                let name: String = k.extract().map_err(|_| {
                    type_error(format!(
                        "inputs must map tensor names (str) to shapes, got key {k}"
                    ))
                })?;
                let shape = shape_arg(&v, &format!("inputs[{name:?}]"))?;
                Ok((name, shape))
            })
            .collect::<PyResult<_>>()?;
        let text: String = py
            .import("json")?
            .call_method1("dumps", (layers,))
            .map_err(|e| {
                value_error(format!(
                    "layers must be a list of dicts of JSON values: {e}"
                ))
            })?
            .extract()?;
        let layers: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| value_error(format!("layers must be a list of dicts: {e}")))?;
        Ok(Graph(detach(py, || graph::from_layers(&inputs, &layers))?))
    }

    /// A chain of layers from one input named "x", each reading the previous output.
    #[staticmethod]
    fn sequential(
        py: Python<'_>,
        input_shape: &Bound<'_, PyAny>,
        layers: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let inputs = pyo3::types::PyDict::new(py);
        inputs.set_item("x", shape_arg(input_shape, "input_shape")?)?;
        Self::from_layers(py, &inputs, layers)
    }

    fn to_json(&self) -> String {
        self.0.to_json()
    }

    #[getter]
    fn flops(&self) -> u64 {
        self.0.flops()
    }

    #[getter]
    fn macs(&self) -> u64 {
        self.0.flops() / 2
    }

    #[getter]
    fn params(&self) -> u64 {
        self.0.params()
    }

    fn __len__(&self) -> usize {
        self.0.ops.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Graph({} ops, {} buffers, flops={}, params={})",
            self.0.ops.len(),
            self.0.buffers.len(),
            self.0.flops(),
            self.0.params()
        )
    }
}

/// A device's compute, memory and energy figures (see `lowbit.nas.DeviceProfile`).
#[pyclass(module = "lowbit.nas", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct DeviceProfile(pub(crate) device::DeviceProfile);

#[pymethods]
impl DeviceProfile {
    #[new]
    #[pyo3(signature = (name, peak_gops, bandwidth_gbs, *, efficiency=None, overhead_us=0.0,
        kind_overhead_us=None, view_overhead_us=0.0, energy_scale=1.0, dram_pj_per_byte=243.75, description=String::new(),
        sources=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        peak_gops: BTreeMap<String, f64>,
        bandwidth_gbs: f64,
        efficiency: Option<BTreeMap<String, f64>>,
        overhead_us: f64,
        kind_overhead_us: Option<BTreeMap<String, f64>>,
        view_overhead_us: f64,
        energy_scale: f64,
        dram_pj_per_byte: f64,
        description: String,
        sources: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let d = device::DeviceProfile {
            name,
            description,
            peak_gops,
            bandwidth_gbs,
            efficiency: efficiency.unwrap_or_default(),
            overhead_us,
            kind_overhead_us: kind_overhead_us.unwrap_or_default(),
            view_overhead_us,
            energy_scale,
            dram_pj_per_byte,
            sources: sources.unwrap_or_default(),
        };
        d.validate().map_err(super::to_pyerr)?;
        Ok(DeviceProfile(d))
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(DeviceProfile(
            device::DeviceProfile::from_json(text).map_err(super::to_pyerr)?,
        ))
    }

    fn to_json(&self) -> String {
        self.0.to_json()
    }

    /// Writes the JSON with its SHA-256 field, atomically (temporary file + rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let text = self.0.to_json_with_sha256();
        detach(py, || {
            crate::quant::checkpoint::write_atomic(&path, text.as_bytes())
        })
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        detach(py, || {
            let bytes = std::fs::read(&path)
                .map_err(|e| crate::Error::io(format!("cannot read {}", path.display()), e))?;
            let at = |m| format!("{}: {m}", path.display());
            let text = std::str::from_utf8(&bytes)
                .map_err(|e| crate::Error::format(at(format!("not UTF-8 text: {e}"))))?;
            device::DeviceProfile::from_json(text).map_err(|e| match e {
                crate::Error::Format(m) => crate::Error::format(at(m)),
                e => crate::Error::value(at(e.to_string())),
            })
        })
        .map(DeviceProfile)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.0.name
    }
    #[getter]
    fn description(&self) -> &str {
        &self.0.description
    }
    #[getter]
    fn peak_gops(&self) -> BTreeMap<String, f64> {
        self.0.peak_gops.clone()
    }
    #[getter]
    fn bandwidth_gbs(&self) -> f64 {
        self.0.bandwidth_gbs
    }
    #[getter]
    fn efficiency(&self) -> BTreeMap<String, f64> {
        self.0.efficiency.clone()
    }
    #[getter]
    fn overhead_us(&self) -> f64 {
        self.0.overhead_us
    }
    #[getter]
    fn kind_overhead_us(&self) -> BTreeMap<String, f64> {
        self.0.kind_overhead_us.clone()
    }
    #[getter]
    fn view_overhead_us(&self) -> f64 {
        self.0.view_overhead_us
    }
    #[getter]
    fn energy_scale(&self) -> f64 {
        self.0.energy_scale
    }
    #[getter]
    fn dram_pj_per_byte(&self) -> f64 {
        self.0.dram_pj_per_byte
    }
    #[getter]
    fn sources(&self) -> BTreeMap<String, String> {
        self.0.sources.clone()
    }

    /// Peak G ops/s at the precision a weight/activation bit pair computes in.
    fn peak(&self, weight_bits: &Bound<'_, PyAny>, act_bits: &Bound<'_, PyAny>) -> PyResult<f64> {
        let (weight_bits, act_bits) = (
            int_arg(weight_bits, "weight_bits")?,
            int_arg(act_bits, "act_bits")?,
        );
        cost::check_bits(weight_bits, act_bits).map_err(super::to_pyerr)?;
        Ok(self.0.peak(device::precision(weight_bits, act_bits)))
    }

    fn __repr__(&self) -> String {
        format!(
            "DeviceProfile(name={:?}, peak_gops={:?}, bandwidth_gbs={})",
            self.0.name, self.0.peak_gops, self.0.bandwidth_gbs
        )
    }
}

#[pyfunction]
pub fn builtin_devices() -> Vec<DeviceProfile> {
    device::builtin().into_iter().map(DeviceProfile).collect()
}

/// The cost as JSON (`lowbit.nas.Cost` parses it).
#[pyfunction]
pub fn estimate_json(
    py: Python<'_>,
    graph: &Graph,
    device: &DeviceProfile,
    weight_bits: u32,
    act_bits: u32,
) -> PyResult<String> {
    detach(py, || {
        let c = cost::estimate(&graph.0, &device.0, weight_bits, act_bits)?;
        Ok(serde_json::to_string(&c).expect("a cost always serialises"))
    })
}

#[pyfunction]
pub fn fit_device(
    py: Python<'_>,
    graphs: Vec<PyRef<'_, Graph>>,
    measured_ms: Vec<f64>,
    base: &DeviceProfile,
    weight_bits: u32,
    act_bits: u32,
) -> PyResult<DeviceProfile> {
    let gs: Vec<&graph::Graph> = graphs.iter().map(|g| &g.0).collect();
    detach(py, || {
        cost::check_bits(weight_bits, act_bits)?;
        fit::fit(&gs, &measured_ms, &base.0, weight_bits, act_bits)
    })
    .map(DeviceProfile)
}

/// The precomputed-cost core of `lowbit.nas.SearchSpace`.
#[pyclass(module = "lowbit.nas", frozen)]
pub struct SpaceCore(space::SearchSpace);

#[pymethods]
impl SpaceCore {
    #[new]
    fn new(
        costs: PyReadonlyArray3<'_, f64>,
        choices: Vec<usize>,
        base: Vec<f64>,
    ) -> PyResult<Self> {
        let base: [f64; space::METRICS.len()] = base
            .try_into()
            .map_err(|_| value_error(format!("base needs {} metrics", space::METRICS.len())))?;
        space::SearchSpace::new(costs.as_array(), choices, base)
            .map(SpaceCore)
            .map_err(super::to_pyerr)
    }

    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        choices: PyReadonlyArray2<'py, i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let c = choices.as_array();
        Ok(detach(py, || self.0.evaluate(c))?
            .into_pyarray(py)
            .into_any())
    }

    fn expected<'py>(
        &self,
        py: Python<'py>,
        probs: PyReadonlyArray3<'py, f64>,
        metric: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let p = probs.as_array();
        let m = space::metric_index(metric).map_err(super::to_pyerr)?;
        let (v, g) = detach(py, || self.0.expected(p, m))?;
        Ok((v.into_pyarray(py).into_any(), g.into_pyarray(py).into_any()))
    }
}
