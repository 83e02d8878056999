//! A ternary linear layer: weights packed at 2 bits, activations quantized per row to int8, an
//! exact integer GEMM and a float rescale.
use super::binary::SignMatrix;
use super::quant;
use super::ternary::{Acts, Epilogue, Rescale, RowFn, TernaryMatrix};
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct TernaryLinear {
    pub w: TernaryMatrix,
    /// One weight scale, or one per output feature.
    pub scale: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl TernaryLinear {
    pub fn new(codes: ArrayView2<'_, i8>, scale: Vec<f32>, bias: Option<Vec<f32>>) -> Result<Self> {
        let n = codes.nrows();
        ensure!(
            scale.len() == 1 || scale.len() == n,
            "scale must have 1 or {n} entries, got {}",
            scale.len()
        );
        ensure!(
            scale.iter().all(|v| v.is_finite() && *v > 0.0),
            "scales must be finite and positive"
        );
        check_bias(n, bias.as_deref())?;
        Ok(TernaryLinear {
            w: TernaryMatrix::from_codes(codes)?,
            scale,
            bias,
        })
    }

    /// BitNet b1.58 from float weights (absmean, one scale per tensor, the mean added as
    /// torch adds it on this CPU and one thread).
    pub fn from_float(w: ArrayView2<'_, f32>, bias: Option<Vec<f32>>) -> Result<Self> {
        let (codes, scale) = quant::ternary_quantize(w, false, Default::default())?;
        Self::new(codes.view(), scale, bias)
    }

    /// `(q_x @ codes.T) * (scale_w / s_x) + bias` for x (rows, in_features), evaluated in f64
    /// from the exact int32 products and rounded to f32.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        self.forward_post(x, None)
    }

    /// `forward` with `post` run on each finished stretch of an output row while it is in
    /// cache (the activation function that follows the layer).
    pub fn forward_post(
        &self,
        x: ArrayView2<'_, f32>,
        post: Option<&RowFn>,
    ) -> Result<Array2<f32>> {
        let (acts, sx) = Acts::quantize(x)?;
        self.forward_acts(&acts, &sx, post)
    }

    /// `forward_post` on activations `Acts::quantize` made (shared by layers with one input).
    pub fn forward_acts(
        &self,
        acts: &Acts,
        sx: &[f32],
        post: Option<&RowFn>,
    ) -> Result<Array2<f32>> {
        let row: Vec<f64> = sx.iter().map(|&s| 1.0 / s as f64).collect();
        let (col, bias) = epilogue_vectors(self.w.n, &self.scale, self.bias.as_deref());
        let epi = Rescale {
            row: &row,
            col: &col,
            bias: &bias,
            post,
        };
        self.w.matmul_acts(acts, &epi, super::use_avx2())
    }
}

/// An optional bias of `n` finite entries.
pub(super) fn check_bias(n: usize, bias: Option<&[f32]>) -> Result<()> {
    if let Some(b) = bias {
        ensure!(b.len() == n, "bias must have {n} entries, got {}", b.len());
        ensure!(b.iter().all(|v| v.is_finite()), "bias contains NaN or Inf");
    }
    Ok(())
}

/// The per-column scale (one entry, or one per column) and bias (zeros without one) of `n`
/// columns in f64, for the rescale epilogues.
fn epilogue_vectors(n: usize, col: &[f32], bias: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let col: Vec<f64> = if col.len() == 1 {
        vec![col[0] as f64; n]
    } else {
        col.iter().map(|&v| v as f64).collect()
    };
    let bias: Vec<f64> = match bias {
        Some(b) => b.iter().map(|&v| v as f64).collect(),
        None => vec![0.0; n],
    };
    (col, bias)
}

/// `acc` through the `Rescale` epilogue, after the fact (for kernels without a fused one);
/// `col` has one entry or one per column. Rows are split over rayon's threads.
fn rescale(acc: Array2<i32>, row: &[f64], col: &[f32], bias: Option<&[f32]>) -> Array2<f32> {
    let (m, n) = acc.dim();
    let (col, bias) = epilogue_vectors(n, col, bias);
    // The f32 results overwrite the i32 products in place (same size): a second buffer of
    // this size would cost a page fault per 4 KiB on every call.
    let mut buf: Vec<i32> = if acc.is_standard_layout() {
        acc.into_raw_vec_and_offset().0
    } else {
        acc.iter().copied().collect()
    };
    let epi = Rescale {
        row,
        col: &col,
        bias: &bias,
        post: None,
    };
    buf.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, a)| {
        for (j, a) in a.iter_mut().enumerate() {
            *a = epi.out(i, j, *a).to_bits() as i32;
        }
    });
    let out: Vec<f32> = bytemuck::cast_vec(buf);
    Array2::from_shape_vec((m, n), out).expect("m x n")
}

/// An XNOR-Net linear layer: weights are signs with per-row scales `a_w`; each input row is
/// binarized to its signs with scale `a_x = mean(|x|)`;
/// `y = (sign(x) @ sign_w.T) * a_x * a_w + bias` (f64, rounded to f32).
#[derive(Clone, Debug)]
pub struct BinaryLinear {
    pub w: SignMatrix,
    pub scale: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl BinaryLinear {
    pub fn new(signs: ArrayView2<'_, i8>, scale: Vec<f32>, bias: Option<Vec<f32>>) -> Result<Self> {
        let n = signs.nrows();
        ensure!(
            scale.len() == n,
            "scales must have {n} entries, got {}",
            scale.len()
        );
        ensure!(
            scale.iter().all(|v| v.is_finite() && *v >= 0.0),
            "scales must be finite and non-negative"
        );
        check_bias(n, bias.as_deref())?;
        Ok(BinaryLinear {
            w: SignMatrix::from_signs(signs)?,
            scale,
            bias,
        })
    }

    /// Signs of `w - mean(w)` (with `center`) and per-row `mean(|w|)`.
    pub fn from_float(
        w: ArrayView2<'_, f32>,
        bias: Option<Vec<f32>>,
        center: bool,
    ) -> Result<Self> {
        let (signs, scale) = quant::binary_quantize(w, center)?;
        Self::new(signs.view(), scale, bias)
    }

    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        ensure!(x.iter().all(|v| v.is_finite()), "x contains NaN or Inf");
        let k = x.ncols().max(1) as f64;
        let ax: Vec<f64> = x
            .rows()
            .into_iter()
            .map(|r| r.iter().map(|v| v.abs() as f64).sum::<f64>() / k)
            .collect();
        let acc = SignMatrix::from_floats(x)?.matmul(&self.w)?;
        Ok(rescale(acc, &ax, &self.scale, self.bias.as_deref()))
    }
}
