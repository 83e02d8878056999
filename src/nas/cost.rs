//! Cost of a graph on a device at a bit width: a roofline per op (compute at the device's rate
//! for the precision vs bytes over bandwidth, scaled by the op kind's efficiency, plus a fixed
//! overhead), energy from arithmetic and DRAM traffic, and peak live activation memory.
use super::device::{precision, DeviceProfile};
use super::graph::{Graph, Kind, Op, Role, TensorRef};
use crate::{ensure, Result};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct LayerCost {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub flops: u64,
    pub macs: u64,
    /// Parameters this op is the first to read.
    pub params: u64,
    pub weight_bytes: u64,
    /// Bytes read and written (weights at their bit width, activations at `act_bits`).
    pub bytes: u64,
    pub latency_ms: f64,
    pub energy_mj: f64,
    /// "compute", "memory" or "none" (free views).
    pub bound: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub device: String,
    pub weight_bits: u32,
    pub act_bits: u32,
    pub flops: u64,
    pub macs: u64,
    pub params: u64,
    pub weight_bytes: u64,
    pub peak_activation_bytes: u64,
    pub latency_ms: f64,
    pub energy_mj: f64,
    pub layers: Vec<LayerCost>,
}

pub fn check_bits(weight_bits: u32, act_bits: u32) -> Result<()> {
    ensure!(
        (1..=32).contains(&weight_bits),
        "weight_bits must be 1..=32, got {weight_bits}"
    );
    ensure!(
        (1..=32).contains(&act_bits),
        "act_bits must be 1..=32, got {act_bits}"
    );
    Ok(())
}

/// Bits per element a buffer is stored at: matrices and kernels of weights at `weight_bits`,
/// vectors of weights (biases, norm scales) stay float32, activations at `act_bits`.
fn bits_of(g: &Graph, buffer: usize, weight_bits: u32, act_bits: u32) -> u64 {
    let b = &g.buffers[buffer];
    match b.role {
        Role::Weight if b.shape.len() >= 2 => weight_bits as u64,
        Role::Weight | Role::Constant => 32,
        _ => act_bits as u64,
    }
}

fn bytes(numel: u64, bits: u64) -> u64 {
    (numel * bits).div_ceil(8)
}

fn ref_bytes(g: &Graph, t: &TensorRef, wb: u32, ab: u32) -> u64 {
    // A broadcasting view can be larger than its buffer; memory is read once.
    let numel = t.numel().min(g.buffers[t.buffer].numel());
    bytes(numel, bits_of(g, t.buffer, wb, ab))
}

/// The efficiency key of an op: its kind, or `conv_dw` for a depthwise conv.
pub fn kind_key(op: &Op) -> &'static str {
    if op.is_depthwise() {
        return "conv_dw";
    }
    match op.kind {
        Kind::Conv => "conv",
        Kind::Matmul => "matmul",
        Kind::Attention => "attention",
        Kind::Norm => "norm",
        Kind::Activation => "activation",
        Kind::Pool => "pool",
        Kind::Softmax => "softmax",
        Kind::Elementwise => "elementwise",
        Kind::Reduce => "reduce",
        Kind::Embedding => "embedding",
        Kind::Copy => "copy",
        Kind::View => "view",
        Kind::Other => "other",
    }
}

/// Energy of one multiply-accumulate in pJ at 45 nm (Horowitz, ISSCC 2014): float for float
/// activations, else an integer multiplier scaled by the product of operand widths (8x8 bits =
/// 0.2 pJ) plus an adder scaled by width (8 bits = 0.03 pJ).
pub fn mac_pj(weight_bits: u32, act_bits: u32) -> f64 {
    match precision(weight_bits, act_bits) {
        "f32" => 3.7 + 0.9,
        "f16" => 1.1 + 0.4,
        _ => {
            let (w, a) = (weight_bits.min(8) as f64, act_bits as f64);
            0.2 * w * a / 64.0 + 0.03 * w.max(a) / 8.0
        }
    }
}

/// Energy of one elementwise op (an add) at the activation width, pJ at 45 nm.
fn elem_pj(act_bits: u32) -> f64 {
    match act_bits {
        17.. => 0.9,
        9..=16 => 0.4,
        b => 0.03 * b as f64 / 8.0,
    }
}

/// Per-op quantities the latency model combines, shared with the fitted model.
pub struct OpTerms {
    pub compute_s: f64,
    pub memory_s: f64,
    pub bytes: u64,
    pub flops: u64,
}

pub fn op_terms(g: &Graph, op: &Op, d: &DeviceProfile, wb: u32, ab: u32) -> OpTerms {
    let flops = op.flops();
    let bytes: u64 = if op.kind == Kind::View {
        0
    } else {
        op.inputs
            .iter()
            .chain(&op.outputs)
            .map(|t| ref_bytes(g, t, wb, ab))
            .sum()
    };
    OpTerms {
        compute_s: flops as f64 / (d.peak(precision(wb, ab)) * 1e9),
        memory_s: bytes as f64 / (d.bandwidth_gbs * 1e9),
        bytes,
        flops,
    }
}

/// The largest total of activation bytes alive at once: a buffer lives from the op that writes
/// it (graph inputs from the start) to the last op that touches it.
pub fn peak_activation_bytes(g: &Graph, act_bits: u32) -> u64 {
    let n = g.ops.len().max(1);
    let mut first = vec![usize::MAX; g.buffers.len()];
    let mut last = vec![0usize; g.buffers.len()];
    for (i, b) in g.buffers.iter().enumerate() {
        if b.role == Role::Input {
            first[i] = 0;
        }
    }
    for (i, op) in g.ops.iter().enumerate() {
        for t in op.inputs.iter().chain(&op.outputs) {
            first[t.buffer] = first[t.buffer].min(i);
            last[t.buffer] = last[t.buffer].max(i);
        }
    }
    let mut delta = vec![0i128; n + 1];
    for (i, b) in g.buffers.iter().enumerate() {
        if matches!(b.role, Role::Weight | Role::Constant) || first[i] == usize::MAX {
            continue;
        }
        let size = bytes(b.numel(), act_bits as u64) as i128;
        delta[first[i]] += size;
        delta[last[i].max(first[i]) + 1] -= size;
    }
    let (mut live, mut peak) = (0i128, 0i128);
    for d in &delta[..n] {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

pub fn estimate(g: &Graph, d: &DeviceProfile, weight_bits: u32, act_bits: u32) -> Result<Cost> {
    check_bits(weight_bits, act_bits)?;
    d.validate()?;
    let (wb, ab) = (weight_bits, act_bits);
    let mac_energy = mac_pj(wb, ab) * d.energy_scale;
    let elem_energy = elem_pj(ab) * d.energy_scale;
    let mut seen = vec![false; g.buffers.len()];
    let mut layers = Vec::with_capacity(g.ops.len());
    for op in &g.ops {
        let terms = op_terms(g, op, d, wb, ab);
        let (mut params, mut weight_bytes) = (0, 0);
        // A weight belongs to the first op that computes with it, not to a view (a transpose).
        for t in op.inputs.iter().filter(|_| op.kind != Kind::View) {
            let b = &g.buffers[t.buffer];
            if b.role == Role::Weight && !std::mem::replace(&mut seen[t.buffer], true) {
                params += b.numel();
                weight_bytes += bytes(b.numel(), bits_of(g, t.buffer, wb, ab));
            }
        }
        let key = kind_key(op);
        let (latency_s, bound) = if op.kind == Kind::View {
            (d.overhead(key) * 1e-6, "none")
        } else {
            let eff = d.efficiency(key);
            let bound = if terms.compute_s > terms.memory_s {
                "compute"
            } else {
                "memory"
            };
            (
                terms.compute_s.max(terms.memory_s) / eff + d.overhead(key) * 1e-6,
                bound,
            )
        };
        let elems = if op.kind.is_mac() || op.kind == Kind::View {
            0
        } else {
            op.outputs.first().map_or(0, TensorRef::numel)
        };
        let energy_pj = (terms.flops / 2) as f64 * mac_energy
            + elems as f64 * elem_energy
            + terms.bytes as f64 * d.dram_pj_per_byte;
        layers.push(LayerCost {
            name: op.name.clone(),
            kind: key.to_string(),
            target: op.target.clone(),
            flops: terms.flops,
            macs: terms.flops / 2,
            params,
            weight_bytes,
            bytes: terms.bytes,
            latency_ms: latency_s * 1e3,
            energy_mj: energy_pj * 1e-9,
            bound,
        });
    }
    // Weights no op read (and parameters the capture could not attribute) still take space.
    let unread: u64 = g
        .buffers
        .iter()
        .enumerate()
        .filter(|(i, b)| b.role == Role::Weight && !seen[*i])
        .map(|(i, b)| bytes(b.numel(), bits_of(g, i, wb, ab)))
        .sum::<u64>()
        + bytes(g.extra_params, wb as u64);
    let flops = layers.iter().map(|l| l.flops).sum();
    Ok(Cost {
        device: d.name.clone(),
        weight_bits,
        act_bits,
        flops,
        macs: layers.iter().map(|l| l.macs).sum(),
        params: g.params(),
        weight_bytes: layers.iter().map(|l| l.weight_bytes).sum::<u64>() + unread,
        peak_activation_bytes: peak_activation_bytes(g, act_bits),
        latency_ms: layers.iter().map(|l| l.latency_ms).sum(),
        energy_mj: layers.iter().map(|l| l.energy_mj).sum(),
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{device::builtin, graph::from_layers};
    use super::*;
    use serde_json::json;

    #[test]
    fn roofline_and_memory() {
        let g = from_layers(
            &[("x".into(), vec![1, 1024])],
            json!([
                {"op": "linear", "name": "fc1", "out_features": 1024, "bias": false},
                {"op": "relu", "name": "r"},
                {"op": "linear", "name": "fc2", "out_features": 16, "bias": false}
            ])
            .as_array()
            .unwrap(),
        )
        .unwrap();
        let d = &builtin()[0];
        let c32 = estimate(&g, d, 32, 32).unwrap();
        let c4 = estimate(&g, d, 4, 8).unwrap();
        assert_eq!(c32.weight_bytes, (1024 * 1024 + 1024 * 16) * 4);
        assert_eq!(c4.weight_bytes, (1024 * 1024 + 1024 * 16) / 2);
        assert_eq!(c32.flops, 2 * (1024 * 1024 + 1024 * 16));
        // fc1: weights dominate bytes, so a GEMV is memory bound and 4-bit is ~8x faster.
        assert_eq!(c32.layers[0].bound, "memory");
        let ratio = c32.layers[0].latency_ms / c4.layers[0].latency_ms;
        assert!(ratio > 5.0 && ratio < 8.1, "{ratio}");
        // Peak: x (4 KiB) + fc1 out (4 KiB) live together at fc1; relu reads fc1 and writes r.
        assert_eq!(c32.peak_activation_bytes, 2 * 4096);
        assert!(c4.energy_mj < c32.energy_mj);
        assert!(estimate(&g, d, 0, 8).is_err());
    }
}
