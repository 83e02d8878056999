//! A ternary linear layer: weights packed at 2 bits, activations quantized per row to int8, an
//! exact integer GEMM and a float rescale.
use super::quant;
use super::ternary::TernaryMatrix;
use crate::{ensure, Result};
use ndarray::{Array2, ArrayView2};

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
            scale.iter().all(|s| s.is_finite() && *s > 0.0),
            "scales must be positive and finite"
        );
        if let Some(b) = &bias {
            ensure!(b.len() == n, "bias must have {n} entries, got {}", b.len());
        }
        Ok(TernaryLinear {
            w: TernaryMatrix::from_codes(codes)?,
            scale,
            bias,
        })
    }

    /// BitNet b1.58 from float weights (absmean, one scale per tensor).
    pub fn from_float(w: ArrayView2<'_, f32>, bias: Option<Vec<f32>>) -> Result<Self> {
        let (codes, scale) = quant::ternary_quantize(w, false)?;
        Self::new(codes.view(), scale, bias)
    }

    /// `(q_x @ codes.T) * (scale_w / s_x) + bias` for x (rows, in_features), evaluated in f64
    /// from the exact int32 products.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (q, sx) = quant::activation_quant(x, 8)?;
        let acc = self.w.matmul(q.view())?;
        Ok(Array2::from_shape_fn(acc.dim(), |(i, j)| {
            let sw = self.scale[if self.scale.len() == 1 { 0 } else { j }] as f64;
            let b = self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
            (acc[[i, j]] as f64 * (sw / sx[i] as f64) + b) as f32
        }))
    }
}
