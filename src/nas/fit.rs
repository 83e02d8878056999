//! Fitting a device profile's per-op-kind efficiencies and per-op overheads to measured
//! latencies. The estimate of a graph is linear in `1 / efficiency` and in the overheads:
//! `latency = Σ_kind (1/eff_kind) Σ_ops max(compute, memory) + Σ_kind overhead_kind · n_kind`,
//! so a non-negative least-squares fit in relative error recovers them exactly when
//! the model holds.
use super::cost::{kind_key, op_terms};
use super::device::DeviceProfile;
use super::graph::{Graph, Kind};
use crate::{ensure, Result};

/// Kinds fitted together (too few ops of their own to pin a coefficient down).
pub const GROUPS: [&[&str]; 9] = [
    &["conv"],
    &["conv_dw"],
    &["matmul"],
    &["attention"],
    &["norm"],
    &["activation"],
    &["elementwise"],
    &["pool", "softmax", "reduce"],
    &["embedding", "copy", "other"],
];
/// Kinds whose per-op overhead is fitted on its own (the rest share `overhead_us`).
pub const OVERHEAD_GROUPS: [&[&str]; 2] = [&["conv", "conv_dw"], &["matmul", "attention"]];
const G: usize = GROUPS.len();
const N: usize = G + OVERHEAD_GROUPS.len() + 2;

fn group(key: &str) -> Option<usize> {
    GROUPS.iter().position(|g| g.contains(&key))
}

/// One graph's features: the roofline time at efficiency 1 summed per group, then op counts:
/// per overhead group, the other ops, and views.
pub fn features(g: &Graph, d: &DeviceProfile, wb: u32, ab: u32) -> [f64; N] {
    let mut f = [0.0; N];
    for op in &g.ops {
        if op.kind == Kind::View {
            f[N - 1] += 1.0;
            continue;
        }
        let key = kind_key(op);
        let t = op_terms(g, op, d, wb, ab);
        if let Some(i) = group(key) {
            f[i] += t.compute_s.max(t.memory_s) * 1e3;
        }
        match OVERHEAD_GROUPS.iter().position(|o| o.contains(&key)) {
            Some(i) => f[G + i] += 1.0,
            None => f[N - 2] += 1.0,
        }
    }
    f
}

/// Lawson–Hanson non-negative least squares: argmin |A x - b| with x >= 0 (A row-major m x n).
/// Columns are scaled to unit norm first, so features of very different magnitudes (milliseconds
/// and op counts) are treated alike.
pub fn nnls(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = a.first().map_or(0, Vec::len);
    let norms: Vec<f64> = (0..n)
        .map(|j| a.iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt())
        .map(|v| if v > 0.0 { v } else { 1.0 })
        .collect();
    let scaled: Vec<Vec<f64>> = a
        .iter()
        .map(|r| r.iter().zip(&norms).map(|(v, s)| v / s).collect())
        .collect();
    nnls_unit(&scaled, b)
        .iter()
        .zip(&norms)
        .map(|(x, s)| x / s)
        .collect()
}

fn nnls_unit(a: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let n = a.first().map_or(0, Vec::len);
    let mut x = vec![0.0; n];
    let mut passive = vec![false; n];
    let grad = |x: &[f64]| -> Vec<f64> {
        let r: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(row, bi)| bi - row.iter().zip(x).map(|(p, q)| p * q).sum::<f64>())
            .collect();
        (0..n)
            .map(|j| a.iter().zip(&r).map(|(row, ri)| row[j] * ri).sum())
            .collect()
    };
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-300);
    for _outer in 0..3 * n + 10 {
        let w = grad(&x);
        let Some(j) = (0..n)
            .filter(|&j| !passive[j] && w[j] > 1e-12 * scale)
            .max_by(|&p, &q| w[p].total_cmp(&w[q]))
        else {
            break;
        };
        passive[j] = true;
        for _inner in 0..3 * n + 10 {
            let z = solve_passive(a, b, &passive);
            if (0..n).all(|i| !passive[i] || z[i] > 0.0) {
                x = z;
                break;
            }
            // Step back to the boundary and drop the variables that hit zero.
            let alpha = (0..n)
                .filter(|&i| passive[i] && z[i] <= 0.0)
                .map(|i| x[i] / (x[i] - z[i]))
                .fold(f64::INFINITY, f64::min);
            for i in 0..n {
                x[i] += alpha * (z[i] - x[i]);
                if passive[i] && x[i] <= 1e-15 {
                    passive[i] = false;
                    x[i] = 0.0;
                }
            }
        }
    }
    x
}

/// Unconstrained least squares over the passive columns, by Householder QR (the systems here
/// have a dozen unknowns; QR keeps the precision that normal equations would square away).
fn solve_passive(a: &[Vec<f64>], b: &[f64], passive: &[bool]) -> Vec<f64> {
    let cols: Vec<usize> = (0..passive.len()).filter(|&j| passive[j]).collect();
    let (m, p) = (a.len(), cols.len());
    // Column-major copy of the passive columns, and the right-hand side.
    let mut q: Vec<Vec<f64>> = cols
        .iter()
        .map(|&j| a.iter().map(|r| r[j]).collect())
        .collect();
    let mut y = b.to_vec();
    let mut z = vec![0.0; passive.len()];
    let rank = p.min(m);
    for k in 0..rank {
        let norm = q[k][k..].iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let alpha = if q[k][k] > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = q[k][k..].to_vec();
        v[0] -= alpha;
        let vv = v.iter().map(|x| x * x).sum::<f64>();
        if vv == 0.0 {
            continue;
        }
        let reflect = |x: &mut [f64]| {
            let f = 2.0 * v.iter().zip(x.iter()).map(|(p, q)| p * q).sum::<f64>() / vv;
            for (xi, vi) in x.iter_mut().zip(&v) {
                *xi -= f * vi;
            }
        };
        for col in q.iter_mut().skip(k) {
            reflect(&mut col[k..]);
        }
        reflect(&mut y[k..]);
    }
    // Back substitution on R (upper triangle of q); a zero pivot leaves its unknown at 0.
    let mut x = vec![0.0; p];
    for k in (0..rank).rev() {
        let r = q[k][k];
        if r.abs() <= 1e-13 * q[0][0].abs().max(f64::MIN_POSITIVE) {
            continue;
        }
        let s: f64 = (k + 1..rank).map(|j| q[j][k] * x[j]).sum();
        x[k] = (y[k] - s) / r;
    }
    for (i, &j) in cols.iter().enumerate() {
        z[j] = x[i];
    }
    z
}

/// Fits `base`'s efficiencies and overheads to measured latencies (ms) of graphs, minimising
/// relative error. Groups no training graph exercises keep `base`'s values.
pub fn fit(
    graphs: &[&Graph],
    measured_ms: &[f64],
    base: &DeviceProfile,
    wb: u32,
    ab: u32,
) -> Result<DeviceProfile> {
    ensure!(
        graphs.len() == measured_ms.len(),
        "{} graphs but {} measurements",
        graphs.len(),
        measured_ms.len()
    );
    ensure!(!graphs.is_empty(), "fit needs at least one measured graph");
    for (i, &y) in measured_ms.iter().enumerate() {
        ensure!(
            y.is_finite() && y > 0.0,
            "measured_ms[{i}] must be positive and finite, got {y}"
        );
    }
    base.validate()?;
    let rows: Vec<[f64; N]> = graphs.iter().map(|g| features(g, base, wb, ab)).collect();
    let used: Vec<usize> = (0..N)
        .filter(|&j| rows.iter().any(|r| r[j] > 0.0))
        .collect();
    let a: Vec<Vec<f64>> = rows
        .iter()
        .zip(measured_ms)
        .map(|(r, y)| used.iter().map(|&j| r[j] / y).collect())
        .collect();
    let theta = nnls(&a, &vec![1.0; a.len()]);
    let mut d = base.clone();
    for (&j, &t) in used.iter().zip(&theta) {
        match j {
            j if j == N - 2 => d.overhead_us = t * 1e3,
            j if j == N - 1 => d.view_overhead_us = t * 1e3,
            j if j >= G => {
                for k in OVERHEAD_GROUPS[j - G] {
                    d.kind_overhead_us.insert(k.to_string(), t * 1e3);
                }
            }
            j => {
                // A zero coefficient means the group costs nothing measurable: cap efficiency.
                let eff = if t > 0.0 { (1.0 / t).min(1e6) } else { 1e6 };
                for k in GROUPS[j] {
                    d.efficiency.insert(k.to_string(), eff);
                }
            }
        }
    }
    d.name = format!("{} (fitted)", base.name);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnls_recovers_a_nonnegative_solution() {
        let a = vec![
            vec![1.0, 0.0, 1.0],
            vec![0.0, 1.0, 1.0],
            vec![1.0, 1.0, 0.0],
            vec![2.0, 1.0, 1.0],
        ];
        let x = [0.5, 2.0, 0.0];
        let b: Vec<f64> = a
            .iter()
            .map(|r| r.iter().zip(&x).map(|(p, q)| p * q).sum())
            .collect();
        let got = nnls(&a, &b);
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-9, "{got:?}");
        }
        // Columns a million times apart in scale, some true coefficients zero.
        let mut s = 1u64;
        let mut r = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let x: Vec<f64> = (0..11)
            .map(|i| if i % 3 == 0 { 0.0 } else { r() })
            .collect();
        let a: Vec<Vec<f64>> = (0..30)
            .map(|_| (0..11i32).map(|j| r() * 10f64.powi(j % 7 - 3)).collect())
            .collect();
        let b: Vec<f64> = a
            .iter()
            .map(|row| row.iter().zip(&x).map(|(p, q)| p * q).sum())
            .collect();
        for (g, w) in nnls(&a, &b).iter().zip(&x) {
            assert!((g - w).abs() < 1e-9, "{g} vs {w}");
        }
        // The unconstrained optimum has a negative entry; NNLS clamps it.
        let got = nnls(&[vec![1.0, 1.0], vec![1.0, -1.0]], &[0.0, 2.0]);
        assert!(got.iter().all(|v| *v >= 0.0), "{got:?}");
    }
}
