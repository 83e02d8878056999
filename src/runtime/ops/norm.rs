//! Layer norm over rows, with the residual sum fused in.
use super::math::sum;
use super::{assume_init, rows_per_task, uninit};
use crate::quant::simd::{dispatch, Kernel};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `LayerNorm(x [+ residual])` over rows of `h` features (two-pass mean and variance). The
/// sum is formed row by row inside the kernel, never stored, and the output written once.
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) -> Vec<f32> {
    let h = weight.len();
    assert!(h > 0 && x.len().is_multiple_of(h) && bias.len() == h);
    if let Some(r) = residual {
        assert_eq!(r.len(), x.len());
    }
    let mut out = uninit(x.len());
    let per = rows_per_task(x.len() / h, h, 1 << 14) * h;
    out.par_chunks_mut(per).enumerate().for_each(|(i, out)| {
        let at = i * per..i * per + out.len();
        dispatch(NormRows {
            x: &x[at.clone()],
            residual: residual.map(|r| &r[at]),
            out,
            weight,
            bias,
            eps,
        })
    });
    // SAFETY: NormRows wrote every element of every block.
    unsafe { assume_init(out) }
}

struct NormRows<'a> {
    x: &'a [f32],
    residual: Option<&'a [f32]>,
    out: &'a mut [MaybeUninit<f32>],
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl Kernel for NormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: crate::quant::simd::Isa>(self) {
        let h = self.weight.len();
        let mut sum_row = vec![0f32; h];
        for (r, (x, out)) in self
            .x
            .chunks_exact(h)
            .zip(self.out.chunks_exact_mut(h))
            .enumerate()
        {
            let row: &[f32] = match self.residual {
                Some(res) => {
                    for ((s, a), b) in sum_row.iter_mut().zip(x).zip(&res[r * h..(r + 1) * h]) {
                        *s = a + b;
                    }
                    &sum_row
                }
                None => x,
            };
            let mean = sum(row) / h as f32;
            let mut var = [0f32; 8];
            let chunks = row.chunks_exact(8);
            let mut tail = 0f32;
            for v in chunks.remainder() {
                tail += (v - mean) * (v - mean);
            }
            for c in chunks {
                for i in 0..8 {
                    var[i] += (c[i] - mean) * (c[i] - mean);
                }
            }
            let var = (var.iter().sum::<f32>() + tail) / h as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for (((o, v), w), b) in out.iter_mut().zip(row).zip(self.weight).zip(self.bias) {
                *o = MaybeUninit::new((v - mean) * inv * w + b);
            }
        }
    }
}
