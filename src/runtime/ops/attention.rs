//! Multi-head scaled dot-product attention with key-padding and causal masks.
#[cfg(target_arch = "x86_64")]
use super::gemm::small_gemm;
use super::gemm::{gemm_into, Mat};
use super::softmax::SoftmaxRows;
use crate::quant::simd::dispatch;
use rayon::prelude::*;

/// Shapes of a multi-head attention: queries (batch, lq, heads * dim) and keys / values
/// (batch, lk, heads * dim), all row-major and contiguous.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub lq: usize,
    pub lk: usize,
    pub heads: usize,
    pub dim: usize,
}

/// Scaled dot-product attention, `softmax(q k^T / sqrt(dim) + mask) v`, per (batch, head).
/// `mask` is added to the scores: (batch, lk) for key padding (0 or a large negative number);
/// `causal` hides key j from query i when j > i + lk - lq. Returns (batch, lq, heads * dim).
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    mask: Option<&[f32]>,
    causal: bool,
) -> Vec<f32> {
    let h = s.heads * s.dim;
    assert_eq!(q.len(), s.batch * s.lq * h);
    assert!(k.len() == s.batch * s.lk * h && v.len() == k.len());
    if let Some(m) = mask {
        assert_eq!(m.len(), s.batch * s.lk);
    }
    let scale = 1.0 / (s.dim as f32).sqrt();
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::quant::simd::simd_level() >= 2;
    let heads: Vec<Vec<f32>> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|task| {
            let (b, hd) = (task / s.heads, task % s.heads);
            let qo = b * s.lq * h + hd * s.dim;
            let ko = b * s.lk * h + hd * s.dim;
            let mut scores = vec![0f32; s.lq * s.lk];
            let mut ctx = vec![0f32; s.lq * s.dim];
            let bias = mask.map(|m| &m[b * s.lk..(b + 1) * s.lk]);
            let causal = causal.then(|| s.lk.saturating_sub(s.lq));
            let softmax = |scores: &mut [f32]| {
                dispatch(SoftmaxRows {
                    scores,
                    lk: s.lk,
                    bias,
                    causal,
                })
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // This head's keys transposed and its values, each row zero-padded to a whole
                // number of vectors, so that the register tiles read whole vectors.
                let (lkp, dp) = (s.lk.next_multiple_of(8), s.dim.next_multiple_of(8));
                let mut kt = vec![0f32; s.dim * lkp];
                let mut vp = vec![0f32; s.lk * dp];
                // SAFETY: as for the products below.
                unsafe { small_gemm::transpose(s.lk, s.dim, (&k[ko..], h), (&mut kt, lkp)) };
                for (j, row) in vp.chunks_exact_mut(dp).enumerate() {
                    row[..s.dim].copy_from_slice(&v[ko + j * h..][..s.dim]);
                }
                let qh = &q[qo..];
                // SAFETY: the CPU has AVX2 and FMA; the operands' shapes are as stated.
                unsafe {
                    small_gemm::gemm(
                        s.lq,
                        s.lk,
                        s.dim,
                        (qh, h),
                        (&kt, lkp),
                        scale,
                        (&mut scores, s.lk),
                    );
                }
                softmax(&mut scores);
                // SAFETY: as above.
                unsafe {
                    small_gemm::gemm(
                        s.lq,
                        s.dim,
                        s.lk,
                        (&scores, s.lk),
                        (&vp, dp),
                        1.0,
                        (&mut ctx, s.dim),
                    );
                }
                return ctx;
            }
            // SAFETY: q/k rows are h floats apart and this head's dim columns start at qo/ko,
            // all inside q and k (checked above); scores is (lq, lk).
            unsafe {
                gemm_into(
                    s.lq,
                    s.lk,
                    s.dim,
                    scores.as_mut_ptr(),
                    s.lk,
                    false,
                    Mat {
                        ptr: q.as_ptr().add(qo),
                        rs: h as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: k.as_ptr().add(ko),
                        rs: 1,
                        cs: h as isize,
                    },
                    scale,
                    gemm::Parallelism::None,
                )
            };
            softmax(&mut scores);
            // SAFETY: as above for v; ctx is (lq, dim).
            unsafe {
                gemm_into(
                    s.lq,
                    s.dim,
                    s.lk,
                    ctx.as_mut_ptr(),
                    s.dim,
                    false,
                    Mat {
                        ptr: scores.as_ptr(),
                        rs: s.lk as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: v.as_ptr().add(ko),
                        rs: h as isize,
                        cs: 1,
                    },
                    1.0,
                    gemm::Parallelism::None,
                )
            };
            ctx
        })
        .collect();
    let mut out = vec![0f32; s.batch * s.lq * h];
    out.par_chunks_mut((s.lq * h).max(1))
        .enumerate()
        .for_each(|(b, dst)| {
            for (hd, ctx) in heads[b * s.heads..(b + 1) * s.heads].iter().enumerate() {
                for (i, row) in ctx.chunks_exact(s.dim).enumerate() {
                    dst[i * h + hd * s.dim..][..s.dim].copy_from_slice(row);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_attention(s: AttnShape) {
        let (h, (lq, lk, dim)) = (s.heads * s.dim, (s.lq, s.lk, s.dim));
        let f = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let (q, k, v) = (
            f(s.batch * lq * h, 1),
            f(s.batch * lk * h, 2),
            f(s.batch * lk * h, 3),
        );
        let mut mask = vec![0f32; s.batch * lk];
        mask[s.batch * lk - 1] = f32::MIN;
        for causal in [false, true] {
            let out = attention(&q, &k, &v, s, Some(&mask), causal);
            for b in 0..s.batch {
                for hd in 0..s.heads {
                    for i in 0..lq {
                        let mut sc: Vec<f64> = (0..lk)
                            .map(|j| {
                                let d: f64 = (0..dim)
                                    .map(|c| {
                                        q[(b * lq + i) * h + hd * dim + c] as f64
                                            * k[(b * lk + j) * h + hd * dim + c] as f64
                                    })
                                    .sum();
                                let hidden = mask[b * lk + j] < 0.0
                                    || (causal && j > i + lk.saturating_sub(lq));
                                if hidden {
                                    f64::NEG_INFINITY
                                } else {
                                    d / (dim as f64).sqrt()
                                }
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        sc.iter_mut().for_each(|x| *x = (*x - m).exp());
                        let z: f64 = sc.iter().sum();
                        for c in 0..dim {
                            let want: f64 = (0..lk)
                                .map(|j| sc[j] / z * v[(b * lk + j) * h + hd * dim + c] as f64)
                                .sum();
                            let got = out[(b * lq + i) * h + hd * dim + c] as f64;
                            assert!((got - want).abs() < 2e-6, "{s:?} {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_matches_naive() {
        // Partial register tiles in both directions, one-vector and padded columns, and BERT's
        // head shape.
        for (batch, lq, lk, heads, dim) in [
            (2, 5, 7, 3, 4),
            (1, 13, 37, 2, 20),
            (2, 17, 9, 1, 8),
            (1, 1, 40, 2, 24),
            (2, 32, 32, 2, 32),
        ] {
            check_attention(AttnShape {
                batch,
                lq,
                lk,
                heads,
                dim,
            });
        }
    }
}
