//! The op graph: buffers (inputs, weights, activations) and the ops that read and write them,
//! in execution order, with exact FLOP counts by the formulas of
//! `torch.utils.flop_counter` (FLOPs = 2 x MACs, bias and elementwise work not counted).
use crate::{ensure, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// The most elements a graph's buffers may hold together (and one op's operands), and the most
/// FLOPs it may count: far beyond any model, and small enough that byte counts at up to 32 bits
/// per element and every sum over buffers and ops fit `u64`. `Graph::validate` enforces them.
pub const MAX_ELEMENTS: u64 = 1 << 56;
pub const MAX_FLOPS: u64 = 1 << 62;

/// The product of `xs`, or None when it overflows `u64` (a zero factor makes it 0).
fn product(xs: &[u64]) -> Option<u64> {
    if xs.contains(&0) {
        return Some(0);
    }
    xs.iter().try_fold(1u64, |a, &b| a.checked_mul(b))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A graph input: live from the start.
    Input,
    /// A parameter: counted in `params`, stored at the weight bit width.
    Weight,
    /// A fixed tensor that is not a parameter (running statistics, masks): float32, not counted.
    Constant,
    /// A tensor an op produces.
    Activation,
}

/// One piece of memory: a graph input, a parameter, or a tensor an op produces.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Buffer {
    pub name: String,
    pub shape: Vec<u64>,
    pub role: Role,
}

impl Buffer {
    /// Elements (saturating: `Graph::validate` refuses shapes whose product overflows).
    pub fn numel(&self) -> u64 {
        product(&self.shape).unwrap_or(u64::MAX)
    }
}

/// A tensor an op reads or writes: a view of `buffer` with its own shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorRef {
    pub buffer: usize,
    pub shape: Vec<u64>,
}

impl TensorRef {
    /// Elements (saturating: `Graph::validate` refuses shapes whose product overflows).
    pub fn numel(&self) -> u64 {
        product(&self.shape).unwrap_or(u64::MAX)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Conv,
    Matmul,
    Attention,
    Norm,
    Activation,
    Pool,
    Softmax,
    Elementwise,
    Reduce,
    Embedding,
    Copy,
    View,
    Other,
}

impl Kind {
    pub fn is_mac(self) -> bool {
        matches!(self, Kind::Conv | Kind::Matmul | Kind::Attention)
    }
}

/// One op. Operands by kind: conv `[x, w, (bias)]`, matmul `[a, b, (bias)]` with
/// `a: (..., m, k)`, `b: (..., k, n)`, attention `[q, k, v, ...]` each `(batch, heads, seq, dim)`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Op {
    pub name: String,
    pub kind: Kind,
    #[serde(default)]
    pub target: String,
    pub inputs: Vec<TensorRef>,
    pub outputs: Vec<TensorRef>,
    #[serde(default)]
    pub transposed: bool,
    #[serde(default = "one")]
    pub groups: u64,
}

fn one() -> u64 {
    1
}

impl Op {
    fn shape(&self, i: usize) -> &[u64] {
        &self.inputs[i].shape
    }

    /// FLOPs as `torch.utils.flop_counter.FlopCounterMode` counts them (saturating:
    /// `Graph::validate` refuses graphs whose count overflows).
    pub fn flops(&self) -> u64 {
        self.checked_flops().unwrap_or(u64::MAX)
    }

    fn checked_flops(&self) -> Option<u64> {
        match self.kind {
            Kind::Conv => {
                let (x, w) = (self.shape(0), self.shape(1));
                let spatial = if self.transposed {
                    product(&x[2..])?
                } else {
                    product(&self.outputs[0].shape[2..])?
                };
                product(&[spatial, product(&w[2..])?, x[0], w[0], w[1], 2])
            }
            Kind::Matmul => {
                let (a, b) = (self.shape(0), self.shape(1));
                let batch = product(&a[..a.len() - 2])?;
                product(&[batch, a[a.len() - 2], a[a.len() - 1], b[b.len() - 1], 2])
            }
            Kind::Attention => {
                let (q, k, v) = (self.shape(0), self.shape(1), self.shape(2));
                let scores = product(&[2, q[0], q[1], q[2], k[2]])?;
                scores
                    .checked_mul(q[3])?
                    .checked_add(scores.checked_mul(v[3])?)
            }
            _ => Some(0),
        }
    }

    /// Whether a conv is depthwise (one input channel per group), which runs far below a
    /// dense conv's rate and gets its own efficiency.
    pub fn is_depthwise(&self) -> bool {
        self.kind == Kind::Conv && self.groups > 1 && self.inputs[1].shape[1] == 1
    }

    fn check_shapes(&self) -> Result<()> {
        let need = |n: usize| -> Result<()> {
            ensure!(
                self.inputs.len() >= n && !self.outputs.is_empty(),
                "op '{}' ({:?}) needs {n} inputs and an output, got {} inputs and {} outputs",
                self.name,
                self.kind,
                self.inputs.len(),
                self.outputs.len()
            );
            Ok(())
        };
        let bad =
            |what: String| Error::value(format!("op '{}': shape mismatch: {what}", self.name));
        match self.kind {
            Kind::Conv => {
                need(2)?;
                let (x, w, y) = (self.shape(0), self.shape(1), &self.outputs[0].shape);
                if x.len() < 3 || w.len() != x.len() || y.len() != x.len() {
                    return Err(bad(format!("input {x:?}, weight {w:?}, output {y:?}")));
                }
                ensure!(self.groups >= 1, "op '{}': groups must be >= 1", self.name);
                let cin = if self.transposed {
                    Some(w[0])
                } else {
                    w[1].checked_mul(self.groups)
                };
                if cin != Some(x[1]) {
                    let cin = cin.map_or("too many".to_string(), |c| c.to_string());
                    return Err(bad(format!(
                        "input {x:?} has {} channels, weight {w:?} with groups={} expects {cin}",
                        x[1], self.groups
                    )));
                }
            }
            Kind::Matmul => {
                need(2)?;
                let (a, b) = (self.shape(0), self.shape(1));
                if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
                    return Err(bad(format!("cannot multiply {a:?} by {b:?}")));
                }
            }
            Kind::Attention => {
                need(3)?;
                let (q, k, v) = (self.shape(0), self.shape(1), self.shape(2));
                let ok = q.len() == 4
                    && k.len() == 4
                    && v.len() == 4
                    && q[0] == k[0]
                    && k[0] == v[0]
                    && k[1] == v[1]
                    && k[1] > 0
                    && q[1] % k[1] == 0
                    && q[3] == k[3]
                    && k[2] == v[2];
                if !ok {
                    return Err(bad(format!(
                        "attention needs (batch, heads, seq, dim) q, k, v with matching \
                         batch, key/value heads dividing query heads, q/k dim and k/v length: \
                         q {q:?}, k {k:?}, v {v:?}"
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Buffers and ops in execution order. `extra_params` counts parameters of the model that no op
/// read (so `params` still equals the model's parameter count).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    pub buffers: Vec<Buffer>,
    pub ops: Vec<Op>,
    #[serde(default)]
    pub extra_params: u64,
}

impl Graph {
    pub fn from_json(s: &str) -> Result<Self> {
        let g: Graph =
            serde_json::from_str(s).map_err(|e| Error::value(format!("bad graph JSON: {e}")))?;
        g.validate()?;
        Ok(g)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a graph always serialises")
    }

    /// Checks references, the execution order (a read before the write that produces it means a
    /// cycle or a misordered graph) and the shapes of every op that does arithmetic.
    pub fn validate(&self) -> Result<()> {
        let nb = self.buffers.len();
        let mut written: Vec<Option<usize>> = vec![None; nb];
        for (i, op) in self.ops.iter().enumerate() {
            for t in op.inputs.iter().chain(&op.outputs) {
                ensure!(
                    t.buffer < nb,
                    "op '{}' refers to buffer {} but the graph has {nb}",
                    op.name,
                    t.buffer
                );
            }
            for t in &op.outputs {
                written[t.buffer].get_or_insert(i);
            }
        }
        for (i, op) in self.ops.iter().enumerate() {
            for t in &op.inputs {
                let b = &self.buffers[t.buffer];
                if b.role != Role::Activation {
                    continue;
                }
                match written[t.buffer] {
                    Some(j)
                        if j < i || (j == i && op.outputs.iter().any(|o| o.buffer == t.buffer)) => {
                    }
                    Some(j) => {
                        return Err(Error::value(format!(
                            "op '{}' (#{i}) reads '{}' before op '{}' (#{j}) produces it: \
                             the graph has a cycle or is not in execution order",
                            op.name, b.name, self.ops[j].name
                        )))
                    }
                    None => {
                        return Err(Error::value(format!(
                            "op '{}' reads '{}', which no op produces and which is not an input",
                            op.name, b.name
                        )))
                    }
                }
            }
            op.check_shapes()?;
        }
        self.check_sizes()
    }

    /// Refuses sizes past `MAX_ELEMENTS` and `MAX_FLOPS`, so that no count overflows.
    fn check_sizes(&self) -> Result<()> {
        let too_big = |what: String| {
            Error::value(format!(
                "{what}: the graph is too large to count (more than 2^56 elements or 2^62 FLOPs)"
            ))
        };
        let mut elements = Some(self.extra_params).filter(|&n| n <= MAX_ELEMENTS);
        for b in &self.buffers {
            elements = elements
                .zip(product(&b.shape))
                .and_then(|(a, n)| a.checked_add(n))
                .filter(|&n| n <= MAX_ELEMENTS);
            if elements.is_none() {
                return Err(too_big(format!(
                    "buffer '{}' of shape {:?}",
                    b.name, b.shape
                )));
            }
        }
        let mut flops = 0u64;
        for op in &self.ops {
            let operands = op
                .inputs
                .iter()
                .chain(&op.outputs)
                .try_fold(0u64, |a, t| a.checked_add(product(&t.shape)?));
            let total = op.checked_flops().and_then(|f| flops.checked_add(f));
            match (operands, total) {
                (Some(n), Some(f)) if n <= MAX_ELEMENTS && f <= MAX_FLOPS => flops = f,
                _ => return Err(too_big(format!("op '{}'", op.name))),
            }
        }
        Ok(())
    }

    pub fn flops(&self) -> u64 {
        self.ops.iter().map(Op::flops).sum()
    }

    pub fn params(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.role == Role::Weight)
            .map(Buffer::numel)
            .sum::<u64>()
            + self.extra_params
    }
}

// ---------------------------------------------------------------------------------------------
// Graphs built by hand from layer descriptions, with shape inference.

fn get_u64(l: &Map<String, Value>, key: &str, name: &str, default: Option<u64>) -> Result<u64> {
    match l.get(key) {
        None => default.ok_or_else(|| Error::value(format!("layer '{name}' needs '{key}'"))),
        Some(v) => v.as_u64().ok_or_else(|| {
            Error::value(format!(
                "layer '{name}': '{key}' must be a non-negative integer, got {v}"
            ))
        }),
    }
}

fn get_pair(
    l: &Map<String, Value>,
    key: &str,
    name: &str,
    default: Option<u64>,
) -> Result<[u64; 2]> {
    match l.get(key) {
        Some(Value::Array(a)) if a.len() == 2 => {
            let v: Vec<u64> = a.iter().filter_map(Value::as_u64).collect();
            ensure!(v.len() == 2, "layer '{name}': '{key}' must be two integers");
            Ok([v[0], v[1]])
        }
        _ => {
            let v = get_u64(l, key, name, default)?;
            Ok([v, v])
        }
    }
}

/// Builds a graph from layer descriptions (see `lowbit.nas.Graph.from_layers`).
pub struct Builder {
    g: Graph,
    names: HashMap<String, usize>,
    last: Option<String>,
}

impl Builder {
    pub fn new(inputs: &[(String, Vec<u64>)]) -> Result<Self> {
        ensure!(!inputs.is_empty(), "a graph needs at least one input");
        let mut b = Builder {
            g: Graph::default(),
            names: HashMap::new(),
            last: None,
        };
        for (name, shape) in inputs {
            ensure!(
                !shape.is_empty() && shape.iter().all(|&d| d > 0),
                "input '{name}' needs a non-empty shape of positive sizes, got {shape:?}"
            );
            b.buffer(name, shape.clone(), Role::Input)?;
            b.last = Some(name.clone());
        }
        Ok(b)
    }

    fn buffer(&mut self, name: &str, shape: Vec<u64>, role: Role) -> Result<usize> {
        ensure!(
            !self.names.contains_key(name),
            "two tensors are named '{name}'"
        );
        self.g.buffers.push(Buffer {
            name: name.to_string(),
            shape,
            role,
        });
        self.names
            .insert(name.to_string(), self.g.buffers.len() - 1);
        Ok(self.g.buffers.len() - 1)
    }

    fn tref(&self, id: usize) -> TensorRef {
        TensorRef {
            buffer: id,
            shape: self.g.buffers[id].shape.clone(),
        }
    }

    pub fn finish(self) -> Result<Graph> {
        self.g.validate()?;
        Ok(self.g)
    }

    /// Adds one layer: `{"op": ..., "name": ..., "inputs": [...]}` plus the op's attributes.
    pub fn layer(&mut self, l: &Map<String, Value>) -> Result<()> {
        let op = l
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::value(format!(
                    "layer {} has no 'op' string",
                    Value::Object(l.clone())
                ))
            })?
            .to_string();
        let name = match l.get("name") {
            Some(Value::String(s)) => s.clone(),
            None => format!("{op}{}", self.g.ops.len()),
            Some(v) => {
                return Err(Error::value(format!(
                    "layer name must be a string, got {v}"
                )))
            }
        };
        let input_names: Vec<String> = match l.get("inputs") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        Error::value(format!("layer '{name}': inputs must be tensor names"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(Value::String(s)) => vec![s.clone()],
            None => vec![self.last.clone().expect("builder has an input")],
            Some(v) => return Err(Error::value(format!("layer '{name}': bad inputs {v}"))),
        };
        let ids: Vec<usize> = input_names
            .iter()
            .map(|n| {
                self.names.get(n).copied().ok_or_else(|| {
                    Error::value(format!(
                        "layer '{name}' reads '{n}', which is not an input or an earlier layer \
                         (layers run in the order given, so a cycle cannot be described)"
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let x = self.g.buffers[ids[0]].shape.clone();
        let rank_at_least = |r: usize| -> Result<()> {
            ensure!(
                x.len() >= r,
                "layer '{name}' ({op}) needs an input of rank >= {r}, got shape {x:?}"
            );
            Ok(())
        };
        let mut inputs: Vec<TensorRef> = ids.iter().map(|&i| self.tref(i)).collect();
        let (kind, out, mut groups) = match op.as_str() {
            "conv2d" | "conv" => {
                rank_at_least(4)?;
                ensure!(
                    x.len() == 4,
                    "layer '{name}': conv2d input must be (N, C, H, W), got {x:?}"
                );
                let cout = get_u64(l, "out_channels", &name, None)?;
                let k = get_pair(l, "kernel", &name, None)?;
                let s = get_pair(l, "stride", &name, Some(1))?;
                let p = get_pair(l, "padding", &name, Some(k[0] / 2))?;
                let groups = get_u64(l, "groups", &name, Some(1))?;
                ensure!(
                    cout > 0 && k.iter().all(|&v| v > 0) && s.iter().all(|&v| v > 0) && groups > 0,
                    "layer '{name}': out_channels, kernel, stride and groups must be positive"
                );
                ensure!(
                    x[1].is_multiple_of(groups) && cout % groups == 0,
                    "layer '{name}': shape mismatch: groups={groups} must divide the {} input \
                     and {cout} output channels",
                    x[1]
                );
                let mut out = vec![x[0], cout, 0, 0];
                for d in 0..2 {
                    let span = padded(x[2 + d], p[d], &name)?;
                    ensure!(
                        span >= k[d],
                        "layer '{name}': shape mismatch: kernel {k:?} is larger than the padded \
                         input {x:?}"
                    );
                    out[2 + d] = (span - k[d]) / s[d] + 1;
                }
                let w = self.buffer(
                    &format!("{name}.weight"),
                    vec![cout, x[1] / groups, k[0], k[1]],
                    Role::Weight,
                )?;
                inputs.truncate(1);
                inputs.push(self.tref(w));
                if l.get("bias").and_then(Value::as_bool).unwrap_or(true) {
                    let b = self.buffer(&format!("{name}.bias"), vec![cout], Role::Weight)?;
                    inputs.push(self.tref(b));
                }
                (Kind::Conv, out, groups)
            }
            "linear" => {
                rank_at_least(1)?;
                let n = get_u64(l, "out_features", &name, None)?;
                ensure!(n > 0, "layer '{name}': out_features must be positive");
                let k = *x.last().unwrap();
                if let Some(kin) = l.get("in_features") {
                    ensure!(
                        kin.as_u64() == Some(k),
                        "layer '{name}': shape mismatch: in_features={kin} but the input {x:?} \
                         has {k} features"
                    );
                }
                let w = self.buffer(&format!("{name}.weight"), vec![n, k], Role::Weight)?;
                let mut a = x.clone();
                if a.len() == 1 {
                    a.insert(0, 1);
                }
                inputs = vec![
                    TensorRef {
                        buffer: ids[0],
                        shape: a,
                    },
                    TensorRef {
                        buffer: w,
                        shape: vec![k, n],
                    },
                ];
                if l.get("bias").and_then(Value::as_bool).unwrap_or(true) {
                    let b = self.buffer(&format!("{name}.bias"), vec![n], Role::Weight)?;
                    inputs.push(self.tref(b));
                }
                let mut out = x.clone();
                *out.last_mut().unwrap() = n;
                (Kind::Matmul, out, 1)
            }
            "matmul" => {
                ensure!(ids.len() == 2, "layer '{name}': matmul needs 2 inputs");
                let y = &self.g.buffers[ids[1]].shape;
                ensure!(
                    x.len() >= 2 && y.len() >= 2 && x[x.len() - 1] == y[y.len() - 2],
                    "layer '{name}': shape mismatch: cannot multiply {x:?} by {y:?}"
                );
                let mut out = x[..x.len() - 1].to_vec();
                out.push(y[y.len() - 1]);
                (Kind::Matmul, out, 1)
            }
            "attention" => {
                ensure!(
                    ids.len() == 3,
                    "layer '{name}': attention needs inputs [q, k, v], each (batch, heads, seq, dim)"
                );
                let (v, q) = (self.g.buffers[ids[2]].shape.clone(), x.clone());
                ensure!(
                    q.len() == 4 && v.len() == 4,
                    "layer '{name}': shape mismatch: q {q:?}, v {v:?} must be 4-D"
                );
                (Kind::Attention, vec![q[0], q[1], q[2], v[3]], 1)
            }
            "layernorm" | "batchnorm" | "groupnorm" | "rmsnorm" => {
                rank_at_least(2)?;
                let c = if op == "layernorm" || op == "rmsnorm" {
                    *x.last().unwrap()
                } else {
                    x[1]
                };
                let w = self.buffer(&format!("{name}.weight"), vec![c], Role::Weight)?;
                inputs.push(self.tref(w));
                if op != "rmsnorm" {
                    let b = self.buffer(&format!("{name}.bias"), vec![c], Role::Weight)?;
                    inputs.push(self.tref(b));
                }
                (Kind::Norm, x.clone(), 1)
            }
            "relu" | "relu6" | "gelu" | "silu" | "sigmoid" | "tanh" | "hardswish"
            | "hardsigmoid" => (Kind::Activation, x.clone(), 1),
            "softmax" => (Kind::Softmax, x.clone(), 1),
            "add" | "mul" | "sub" | "div" => {
                ensure!(ids.len() == 2, "layer '{name}': {op} needs 2 inputs");
                let y = self.g.buffers[ids[1]].shape.clone();
                let out = broadcast(&x, &y).ok_or_else(|| {
                    Error::value(format!(
                        "layer '{name}': shape mismatch: cannot broadcast {x:?} with {y:?}"
                    ))
                })?;
                (Kind::Elementwise, out, 1)
            }
            "maxpool" | "avgpool" => {
                ensure!(
                    x.len() == 4,
                    "layer '{name}': {op} input must be (N, C, H, W), got {x:?}"
                );
                let k = get_pair(l, "kernel", &name, None)?;
                let s = get_pair(l, "stride", &name, Some(k[0]))?;
                let p = get_pair(l, "padding", &name, Some(0))?;
                ensure!(
                    k.iter().chain(&s).all(|&v| v > 0),
                    "layer '{name}': kernel and stride must be positive"
                );
                let mut out = x.clone();
                for d in 0..2 {
                    let span = padded(x[2 + d], p[d], &name)?;
                    ensure!(
                        span >= k[d],
                        "layer '{name}': shape mismatch: kernel {k:?} larger than input {x:?}"
                    );
                    out[2 + d] = (span - k[d]) / s[d] + 1;
                }
                (Kind::Pool, out, 1)
            }
            "global_avgpool" => {
                rank_at_least(3)?;
                (Kind::Pool, vec![x[0], x[1]], 1)
            }
            "flatten" => {
                let n = product(&x[1..])
                    .ok_or_else(|| Error::value(format!("layer '{name}': {x:?} is too large")))?;
                (Kind::View, vec![x[0], n], 1)
            }
            "reshape" => {
                let shape: Vec<u64> = l
                    .get("shape")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                ensure!(
                    product(&shape) == product(&x) && product(&x).is_some() && !shape.is_empty(),
                    "layer '{name}': shape mismatch: cannot reshape {x:?} to {:?}",
                    l.get("shape")
                );
                (Kind::View, shape, 1)
            }
            "embedding" => {
                let n = get_u64(l, "num_embeddings", &name, None)?;
                let d = get_u64(l, "dim", &name, None)?;
                let w = self.buffer(&format!("{name}.weight"), vec![n, d], Role::Weight)?;
                inputs.push(self.tref(w));
                let mut out = x.clone();
                out.push(d);
                (Kind::Embedding, out, 1)
            }
            "concat" => {
                let axis = get_u64(l, "axis", &name, Some(1))? as usize;
                ensure!(
                    axis < x.len(),
                    "layer '{name}': axis {axis} out of range for {x:?}"
                );
                let mut out = x.clone();
                for &i in &ids[1..] {
                    let y = &self.g.buffers[i].shape;
                    let same =
                        y.len() == x.len() && (0..x.len()).all(|d| d == axis || x[d] == y[d]);
                    ensure!(same, "layer '{name}': shape mismatch: cannot concatenate {x:?} and {y:?} on axis {axis}");
                    out[axis] = out[axis].checked_add(y[axis]).ok_or_else(|| {
                        Error::value(format!("layer '{name}': the concatenation is too large"))
                    })?;
                }
                (Kind::Copy, out, 1)
            }
            other => {
                return Err(Error::value(format!(
                    "layer '{name}': unknown op '{other}'; known: conv2d, linear, matmul, \
                     attention, layernorm, batchnorm, groupnorm, rmsnorm, relu, relu6, gelu, silu, \
                     sigmoid, tanh, hardswish, hardsigmoid, softmax, add, mul, sub, div, maxpool, \
                     avgpool, global_avgpool, flatten, reshape, embedding, concat"
                )))
            }
        };
        if kind != Kind::Conv {
            groups = 1;
        }
        let o = self.buffer(&name, out.clone(), Role::Activation)?;
        self.g.ops.push(Op {
            name: name.clone(),
            kind,
            target: op,
            inputs,
            outputs: vec![self.tref(o)],
            transposed: false,
            groups,
        });
        self.g.ops.last().unwrap().check_shapes()?;
        self.g
            .check_sizes()
            .map_err(|e| Error::value(format!("layer '{name}': {e}")))?;
        self.last = Some(name);
        Ok(())
    }
}

/// `size + 2 * padding`, refusing an overflow.
fn padded(size: u64, padding: u64, name: &str) -> Result<u64> {
    padding
        .checked_mul(2)
        .and_then(|p| size.checked_add(p))
        .ok_or_else(|| Error::value(format!("layer '{name}': padding {padding} is too large")))
}

fn broadcast(a: &[u64], b: &[u64]) -> Option<Vec<u64>> {
    let n = a.len().max(b.len());
    let at = |s: &[u64], i: usize| {
        if i + s.len() >= n {
            s[i + s.len() - n]
        } else {
            1
        }
    };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// `Builder` over a JSON `{"inputs": {name: shape}, "layers": [...]}`.
pub fn from_layers(inputs: &[(String, Vec<u64>)], layers: &[Value]) -> Result<Graph> {
    let mut b = Builder::new(inputs)?;
    for l in layers {
        let m = l
            .as_object()
            .ok_or_else(|| Error::value(format!("each layer must be a dict, got {l}")))?;
        b.layer(m)?;
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn layers(v: Value) -> Vec<Value> {
        v.as_array().unwrap().clone()
    }

    #[test]
    fn counts_that_would_overflow_are_refused() {
        let huge = 1u64 << 40;
        for (input, layer) in [
            (
                vec![huge, huge],
                json!({"op": "linear", "out_features": huge}),
            ),
            (
                vec![1, 3, 8, 8],
                json!({"op": "conv2d", "out_channels": 4, "kernel": 3, "padding": u64::MAX}),
            ),
            (vec![huge, huge, 8], json!({"op": "flatten"})),
        ] {
            let e = from_layers(&[("x".into(), input)], &[layer]).unwrap_err();
            assert!(e.to_string().contains("too large"), "{e}");
        }
    }

    #[test]
    fn hand_built_counts() {
        let g = from_layers(
            &[("x".into(), vec![1, 3, 32, 32])],
            &layers(json!([
                {"op": "conv2d", "name": "c1", "out_channels": 8, "kernel": 3, "stride": 2},
                {"op": "relu"},
                {"op": "conv2d", "name": "dw", "out_channels": 8, "kernel": 3, "groups": 8, "bias": false},
                {"op": "global_avgpool"},
                {"op": "linear", "name": "fc", "out_features": 10}
            ])),
        )
        .unwrap();
        // conv 3->8 k3 s2 p1: 16x16 out; depthwise 8 k3: 16x16; fc 8->10.
        let c1 = 16 * 16 * 9 * 8 * 3 * 2;
        let dw = 16 * 16 * 9 * 8 * 2;
        assert_eq!(g.flops(), c1 + dw + 8 * 10 * 2);
        assert_eq!(g.params(), 8 * 3 * 9 + 8 + 8 * 9 + 80 + 10);
        assert!(g.ops[2].is_depthwise());
    }

    #[test]
    fn bad_graphs_are_refused() {
        let x = [("x".to_string(), vec![1, 4])];
        let e = from_layers(&x, &layers(json!([{"op": "warp"}]))).unwrap_err();
        assert!(e.to_string().contains("unknown op 'warp'"), "{e}");
        let e = from_layers(
            &x,
            &layers(json!([{"op": "linear", "out_features": 3, "in_features": 5}])),
        )
        .unwrap_err();
        assert!(e.to_string().contains("shape mismatch"), "{e}");
        let e = from_layers(
            &x,
            &layers(json!([{"op": "relu", "inputs": ["later"]}, {"op": "relu", "name": "later"}])),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("not an input or an earlier layer"),
            "{e}"
        );
        // A JSON graph whose op reads a buffer produced later: a cycle.
        let mut g = from_layers(
            &x,
            &layers(json!([{"op": "relu", "name": "a"}, {"op": "relu", "name": "b"}])),
        )
        .unwrap();
        g.ops[0].inputs[0].buffer = 2;
        let e = g.validate().unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
    }
}
