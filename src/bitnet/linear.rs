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
            scale.iter().all(|v| v.is_finite() && *v > 0.0),
            "scales must be finite and positive"
        );
        if let Some(b) = &bias {
            ensure!(b.len() == n, "bias must have {n} entries, got {}", b.len());
            ensure!(b.iter().all(|v| v.is_finite()), "bias contains NaN or Inf");
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
    /// from the exact int32 products and rounded to f32.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        let (q, sx) = quant::activation_quant(x, 8)?;
        let acc = self.w.matmul(q.view())?;
        let mut out = Array2::<f32>::zeros(acc.dim());
        let bias = |j: usize| self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
        for ((mut o, a), &s) in out.outer_iter_mut().zip(acc.outer_iter()).zip(&sx) {
            let sx = s as f64;
            if let [sw] = self.scale[..] {
                // One weight scale: the same ratio for the whole row.
                let ratio = sw as f64 / sx;
                for (j, (o, &a)) in o.iter_mut().zip(a.iter()).enumerate() {
                    *o = (a as f64 * ratio + bias(j)) as f32;
                }
            } else {
                for (j, (o, &a)) in o.iter_mut().zip(a.iter()).enumerate() {
                    *o = (a as f64 * (self.scale[j] as f64 / sx) + bias(j)) as f32;
                }
            }
        }
        Ok(out)
    }
}
