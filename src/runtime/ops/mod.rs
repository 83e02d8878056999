//! Fused CPU kernels on the float32 data of candle tensors: GEMM with bias (the `gemm` crate
//! that candle itself uses, called with the weights in place), activations, residual layer
//! norm and multi-head attention with masks. Rows are split over rayon's threads.

mod attention;
mod gemm;
mod math;
mod norm;
mod softmax;

pub use attention::{attention, AttnShape};
pub use gemm::{linear, PackedWeights};
pub use math::{erf, exp, tanh, Activation};
pub use norm::layer_norm;
pub use softmax::softmax_row;

use super::ce;
use crate::{Error, Result};
use candle_core::{CpuStorage, Device, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Calls `f` with the float32 elements of `t` in row-major order (copying only when `t` is a
/// strided view).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous().map_err(ce)?
    };
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let o = l.start_offset();
            Ok(f(&v[o..o + l.shape().elem_count()]))
        }
        _ => Err(Error::value(format!(
            "runtime tensors are float32 on the CPU, got {:?} on {:?}",
            t.dtype(),
            t.device().location()
        ))),
    }
}

/// A CPU tensor owning `v` (no copy).
pub fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(ce)
}

/// `a + b` with `b` broadcast over the leading dimensions of `a` (its shape a suffix of
/// `a`'s, leading ones allowed): residual connections and position tables. On rayon's threads,
/// not candle's: candle's own pool spins for a while after each large elementwise op, on a
/// core the next of our kernels wants.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    let lead = db.iter().take_while(|&&d| d == 1).count();
    let rest = &db[lead..];
    if rest.len() > da.len() || da[da.len() - rest.len()..] != *rest {
        return Err(Error::value(format!(
            "cannot add a tensor of shape {db:?} to one of shape {da:?}"
        )));
    }
    let out = with_f32(a, |xs| {
        with_f32(b, |ys| {
            let mut out = uninit(xs.len());
            if !ys.is_empty() {
                let per = rows_per_task(xs.len() / ys.len(), ys.len(), 1 << 14) * ys.len();
                out.par_chunks_mut(per)
                    .zip(xs.par_chunks(per))
                    .for_each(|(o, x)| {
                        for ((o, x), y) in o.iter_mut().zip(x).zip(ys.iter().cycle()) {
                            *o = MaybeUninit::new(x + y);
                        }
                    });
            }
            // SAFETY: every element was written (`ys` is empty only when `xs` is).
            unsafe { assume_init(out) }
        })
    })??;
    tensor(out, a.shape().clone())
}

/// A vector of `n` floats to be written before it is read (no memset).
fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { v.set_len(n) };
    v
}

/// # Safety
/// Every element of `v` must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: initialized (the caller's promise); MaybeUninit<f32> has f32's layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

/// Rows per rayon task so that each task has at least `grain` elements of work.
fn rows_per_task(rows: usize, width: usize, grain: usize) -> usize {
    (grain / width.max(1)).clamp(1, rows.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_broadcasts_like_candle() {
        let t = |n: usize, shape: &[usize]| {
            tensor((0..n).map(|i| (i as f32 * 0.37).sin()).collect(), shape).unwrap()
        };
        let a = t(5 * 700 * 24, &[5, 700, 24]);
        for b in [
            t(5 * 700 * 24, &[5, 700, 24]),
            t(700 * 24, &[1, 700, 24]),
            t(700 * 24, &[700, 24]),
            t(24, &[24]),
        ] {
            let want = a.broadcast_add(&b).unwrap();
            let got = add(&a, &b).unwrap();
            assert_eq!(got.dims(), want.dims());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&got), flat(&want));
        }
        assert!(add(&a, &t(23, &[23])).is_err());
        assert!(add(&a, &t(2 * 24, &[2, 1, 24])).is_err());
        let empty = t(0, &[0, 24]);
        assert_eq!(add(&empty, &t(24, &[24])).unwrap().dims(), &[0, 24]);
    }
    #[test]
    fn packed_linear_matches_naive_and_gives_each_row_the_same_bits_in_any_batch() {
        for (rows, k, n) in [
            (33, 19, 7),
            (1, 1, 1),
            (7, 300, 37),
            (13, 64, 16),
            (0, 5, 3),
            (6, 2, 100),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i % 11) as f32 - 5.0) / 3.0)
                .collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
            let Some(p) = PackedWeights::new(&w, n, k) else {
                eprintln!("no AVX2 + FMA here: the packed float GEMM is not used, nothing to test");
                return;
            };
            for bias in [None, Some(&b[..])] {
                let y = p.linear(&x, bias);
                assert_eq!(y.len(), rows * n);
                for r in 0..rows {
                    for j in 0..n {
                        let want: f64 = bias.map_or(0.0, |b| b[j] as f64)
                            + (0..k)
                                .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                                .sum::<f64>();
                        assert!((y[r * n + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                    }
                    // The same row alone: the same bits.
                    let one = p.linear(&x[r * k..(r + 1) * k], bias);
                    assert_eq!(
                        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        y[r * n..(r + 1) * n]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    #[test]
    fn linear_and_layer_norm_match_naive() {
        let (rows, k, n) = (33, 19, 7);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i % 11) as f32 - 5.0) / 3.0)
            .collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
        let y = linear(&x, k, &w, n, Some(&b));
        for r in 0..rows {
            for j in 0..n {
                let want: f64 = b[j] as f64
                    + (0..k)
                        .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                        .sum::<f64>();
                assert!((y[r * n + j] as f64 - want).abs() < 1e-4);
            }
        }
        let g: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 / 10.0).collect();
        let ln = layer_norm(&y, Some(&y), &g, &b, 1e-5);
        for (r, row) in ln.chunks_exact(n).enumerate() {
            let src: Vec<f64> = y[r * n..(r + 1) * n]
                .iter()
                .map(|v| 2.0 * *v as f64)
                .collect();
            let mean = src.iter().sum::<f64>() / n as f64;
            let var = src.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            for j in 0..n {
                let want = (src[j] - mean) / (var + 1e-5).sqrt() * g[j] as f64 + b[j] as f64;
                assert!((row[j] as f64 - want).abs() < 1e-5);
            }
        }
    }
}
