//! Softmax over rows, with the key bias and the causal mask of attention scores.
use super::math::{exp, max, sum};
use crate::quant::simd::{Isa, Kernel};

/// Scores of one (batch, head): the key bias added, later keys hidden (causal), softmax.
pub(super) struct SoftmaxRows<'a> {
    pub(super) scores: &'a mut [f32],
    pub(super) lk: usize,
    pub(super) bias: Option<&'a [f32]>,
    /// Query i sees keys up to i + offset.
    pub(super) causal: Option<usize>,
}

impl Kernel for SoftmaxRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        for (i, row) in self.scores.chunks_exact_mut(self.lk).enumerate() {
            if let Some(m) = self.bias {
                for (x, b) in row.iter_mut().zip(m) {
                    *x += b;
                }
            }
            if let Some(off) = self.causal {
                let from = (i + off + 1).min(self.lk);
                row[from..].fill(f32::NEG_INFINITY);
            }
            softmax_row::<S>(row);
        }
    }
}
/// Softmax of one row in place (max-subtracted).
#[inline(always)]
pub fn softmax_row<S: Isa>(row: &mut [f32]) {
    let m = max(row);
    for v in row.iter_mut() {
        *v = exp::<S>(*v - m);
    }
    let inv = 1.0 / sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}
