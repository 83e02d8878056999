//! A block-wise search space with every choice's cost precomputed: scoring candidates is a
//! gather and a sum, and the expected cost under choice probabilities (ProxylessNAS / FBNet) is
//! linear, with the costs as its gradient.
use crate::{ensure, Result};
use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

pub const METRICS: [&str; 6] = [
    "latency_ms",
    "energy_mj",
    "flops",
    "params",
    "weight_bytes",
    "peak_activation_bytes",
];
/// Metrics that add over blocks; the others (peak memory) take the maximum.
const ADDITIVE: [bool; 6] = [true, true, true, true, true, false];
const M: usize = METRICS.len();

pub fn metric_index(name: &str) -> Result<usize> {
    METRICS
        .iter()
        .position(|m| *m == name)
        .ok_or_else(|| crate::Error::value(format!("unknown metric '{name}'; known: {METRICS:?}")))
}

#[derive(Clone, Debug)]
pub struct SearchSpace {
    /// Number of choices per block.
    pub choices: Vec<usize>,
    /// `max_choices` stride: cost of block b, choice c, metric m at `((b * max) + c) * M + m`.
    costs: Vec<f64>,
    max: usize,
    /// Cost of the fixed part of the network (stem, head), added to every candidate.
    pub base: [f64; M],
}

impl SearchSpace {
    /// `costs` has shape (blocks, max_choices, METRICS); `choices[b]` of block b are used.
    pub fn new(costs: ArrayView3<'_, f64>, choices: Vec<usize>, base: [f64; M]) -> Result<Self> {
        let (nb, max, m) = costs.dim();
        ensure!(
            m == M,
            "costs need {M} metrics {METRICS:?} on the last axis, got {m}"
        );
        ensure!(nb > 0, "a search space needs at least one block");
        ensure!(
            choices.len() == nb,
            "{} choice counts for {nb} blocks",
            choices.len()
        );
        for (b, &c) in choices.iter().enumerate() {
            ensure!(
                c >= 1 && c <= max,
                "block {b} has {c} choices; must be 1..={max}"
            );
            for v in costs.index_axis(Axis(0), b).slice(ndarray::s![..c, ..]) {
                ensure!(
                    v.is_finite() && *v >= 0.0,
                    "block {b}: costs must be finite and >= 0, got {v}"
                );
            }
        }
        ensure!(
            base.iter().all(|v| v.is_finite() && *v >= 0.0),
            "base costs must be finite and >= 0"
        );
        Ok(SearchSpace {
            choices,
            costs: costs.iter().copied().collect(),
            max,
            base,
        })
    }

    pub fn blocks(&self) -> usize {
        self.choices.len()
    }

    /// Metrics of each candidate: `choices` is (n, blocks); returns (n, METRICS).
    pub fn evaluate(&self, cand: ArrayView2<'_, i64>) -> Result<Array2<f64>> {
        let (n, nb) = cand.dim();
        ensure!(
            nb == self.blocks(),
            "candidates have {nb} blocks, the space {}",
            self.blocks()
        );
        for (b, col) in cand.axis_iter(Axis(1)).enumerate() {
            if let Some(bad) = col
                .iter()
                .find(|&&c| c < 0 || c as usize >= self.choices[b])
            {
                return Err(crate::Error::value(format!(
                    "choice {bad} for block {b} is out of range 0..{}",
                    self.choices[b]
                )));
            }
        }
        let mut out = Array2::<f64>::zeros((n, M));
        let row = |c: ndarray::ArrayView1<'_, i64>, o: &mut [f64]| {
            o.copy_from_slice(&self.base);
            for (b, &ch) in c.iter().enumerate() {
                let at = (b * self.max + ch as usize) * M;
                let cost = &self.costs[at..at + M];
                for m in 0..M {
                    o[m] = if ADDITIVE[m] {
                        o[m] + cost[m]
                    } else {
                        o[m].max(cost[m])
                    };
                }
            }
        };
        let flat = out.as_slice_mut().expect("fresh array is contiguous");
        flat.par_chunks_mut(M * 4096)
            .zip(cand.axis_chunks_iter(Axis(0), 4096).into_par_iter())
            .for_each(|(o, c)| {
                for (orow, crow) in o.chunks_mut(M).zip(c.outer_iter()) {
                    row(crow, orow);
                }
            });
        Ok(out)
    }

    /// Expected additive metric under per-block choice probabilities `probs` (batch, blocks,
    /// max_choices), and its gradient with respect to `probs`.
    pub fn expected(
        &self,
        probs: ArrayView3<'_, f64>,
        metric: usize,
    ) -> Result<(Array1<f64>, Array3<f64>)> {
        ensure!(
            ADDITIVE[metric],
            "the expected {} is not linear in the probabilities; use an additive metric",
            METRICS[metric]
        );
        let (batch, nb, nc) = probs.dim();
        ensure!(
            nb == self.blocks() && nc == self.max,
            "probabilities must be (batch, {}, {}), got ({batch}, {nb}, {nc})",
            self.blocks(),
            self.max
        );
        let mut grad = Array3::<f64>::zeros((batch, nb, nc));
        let mut value = Array1::<f64>::from_elem(batch, self.base[metric]);
        grad.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(value.axis_iter_mut(Axis(0)))
            .zip(probs.axis_iter(Axis(0)))
            .try_for_each(|((mut g, mut v), p)| -> Result<()> {
                let mut acc = 0.0;
                for b in 0..nb {
                    for c in 0..nc {
                        let pv = p[[b, c]];
                        ensure!(pv.is_finite(), "probabilities must be finite, got {pv}");
                        if c >= self.choices[b] {
                            ensure!(
                                pv == 0.0,
                                "block {b} has {} choices but probability {pv} is given for \
                                 choice {c}",
                                self.choices[b]
                            );
                            continue;
                        }
                        let cost = self.costs[(b * self.max + c) * M + metric];
                        g[[b, c]] = cost;
                        acc += pv * cost;
                    }
                }
                v[()] += acc;
                Ok(())
            })?;
        Ok((value, grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_and_expected_agree_with_loops() {
        let (nb, nc) = (5, 3);
        let costs = Array3::from_shape_fn((nb, nc, M), |(b, c, m)| (b * 7 + c * 3 + m) as f64);
        let s = SearchSpace::new(costs.view(), vec![3, 2, 3, 1, 3], [1.0; M]).unwrap();
        let cand = ndarray::arr2(&[[0i64, 1, 2, 0, 1], [2, 0, 0, 0, 2]]);
        let out = s.evaluate(cand.view()).unwrap();
        for (i, c) in cand.outer_iter().enumerate() {
            let lat: f64 = 1.0 + (0..nb).map(|b| costs[[b, c[b] as usize, 0]]).sum::<f64>();
            let peak = (0..nb)
                .map(|b| costs[[b, c[b] as usize, 5]])
                .fold(1.0, f64::max);
            assert_eq!(out[[i, 0]], lat);
            assert_eq!(out[[i, 5]], peak);
        }
        assert!(s
            .evaluate(ndarray::arr2(&[[0i64, 2, 0, 0, 0]]).view())
            .is_err());
        let mut p = Array3::<f64>::zeros((1, nb, nc));
        for b in 0..nb {
            p[[0, b, 0]] = 1.0;
        }
        let (v, g) = s.expected(p.view(), 0).unwrap();
        let first = s.evaluate(Array2::zeros((1, nb)).view()).unwrap();
        assert_eq!(v[0], first[[0, 0]]);
        assert_eq!(g[[0, 2, 1]], costs[[2, 1, 0]]);
        p[[0, 3, 2]] = 0.5; // block 3 has one choice
        assert!(s.expected(p.view(), 0).is_err());
        assert!(s.expected(p.view(), 5).is_err());
    }
}
