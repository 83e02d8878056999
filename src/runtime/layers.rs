//! Building blocks on candle tensors: linear layers (float or quantized at load time), layer
//! norm, activations, softmax and multi-head attention.
use super::ce;
use crate::bitnet::linear::TernaryLinear;
use crate::quant::spec::{self, Granularity, QuantSpec};
use crate::{Error, Result};
use candle_core::{Device, Tensor, D};
use ndarray::{Array2, ArrayViewD};

/// How linear weights are stored and multiplied, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    F32,
    /// int8, symmetric, one scale per output channel (dequantized once, float GEMM).
    Int8,
    /// int4, symmetric, one scale per group of 32 inputs (dequantized once, float GEMM).
    Int4,
    /// BitNet b1.58 ternary weights at 2 bits, int8 activations, the packed integer kernel.
    Ternary,
}

impl std::str::FromStr for WeightMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" => WeightMode::F32,
            "int8" => WeightMode::Int8,
            "int4" => WeightMode::Int4,
            "ternary" => WeightMode::Ternary,
            _ => {
                return Err(Error::value(format!(
                    "weights must be 'f32', 'int8', 'int4' or 'ternary', got {s:?}"
                )))
            }
        })
    }
}

impl WeightMode {
    /// The QuantSpec of the integer modes (what `lowbit.QuantSpec` calls the same thing).
    pub fn spec(self) -> Option<QuantSpec> {
        match self {
            WeightMode::Int8 => {
                Some(QuantSpec::new(8, true, Granularity::Channel, 0, None).unwrap())
            }
            WeightMode::Int4 => {
                Some(QuantSpec::new(4, true, Granularity::Group, -1, Some(32)).unwrap())
            }
            _ => None,
        }
    }
}

fn to_array2(t: &Tensor) -> Result<Array2<f32>> {
    let (r, c) = t.dims2().map_err(ce)?;
    let v = t.flatten_all().map_err(ce)?.to_vec1::<f32>().map_err(ce)?;
    Ok(Array2::from_shape_vec((r, c), v).expect("dims match"))
}

fn from_array2(a: Array2<f32>) -> Result<Tensor> {
    let (r, c) = a.dim();
    let v = if a.is_standard_layout() {
        a.into_raw_vec_and_offset().0
    } else {
        a.iter().copied().collect()
    };
    Tensor::from_vec(v, (r, c), &Device::Cpu).map_err(ce)
}

enum Kernel {
    /// (in, out): the transposed weight, contiguous for the GEMM.
    Float(Tensor),
    Ternary(TernaryLinear),
}

pub struct Linear {
    kernel: Kernel,
    bias: Option<Tensor>,
}

impl Linear {
    /// `w` is (out, in) as PyTorch stores it.
    pub fn new(w: Tensor, bias: Option<Tensor>, mode: WeightMode) -> Result<Self> {
        let kernel = match mode {
            WeightMode::F32 => Kernel::Float(w.t().map_err(ce)?.contiguous().map_err(ce)?),
            WeightMode::Int8 | WeightMode::Int4 => {
                let a = to_array2(&w)?;
                let q = spec::quantize(
                    ArrayViewD::from(a.view().into_dyn()),
                    mode.spec().unwrap(),
                    None,
                )?;
                let deq = q.dequantize()?.into_dimensionality().expect("2-D weights");
                Kernel::Float(
                    from_array2(deq)?
                        .t()
                        .map_err(ce)?
                        .contiguous()
                        .map_err(ce)?,
                )
            }
            WeightMode::Ternary => {
                let b = match &bias {
                    Some(b) => Some(b.to_vec1::<f32>().map_err(ce)?),
                    None => None,
                };
                return Ok(Linear {
                    kernel: Kernel::Ternary(TernaryLinear::from_float(to_array2(&w)?.view(), b)?),
                    bias: None,
                });
            }
        };
        Ok(Linear { kernel, bias })
    }

    /// `x @ w.T + b` over the last axis of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims
            .last()
            .ok_or_else(|| Error::value("linear input is a scalar"))?;
        let rows = x.elem_count() / k.max(1);
        let x2 = x.reshape((rows, k)).map_err(ce)?;
        let y = match &self.kernel {
            Kernel::Float(wt) => x2.matmul(wt).map_err(ce)?,
            Kernel::Ternary(t) => from_array2(t.forward(to_array2(&x2)?.view())?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b).map_err(ce)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1).map_err(ce)?;
        y.reshape(out).map_err(ce)
    }
}

pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1).map_err(ce)?;
        let xc = x.broadcast_sub(&mean).map_err(ce)?;
        let var = xc.sqr().map_err(ce)?.mean_keepdim(D::Minus1).map_err(ce)?;
        let inv = (var + self.eps).map_err(ce)?.sqrt().map_err(ce)?;
        xc.broadcast_div(&inv)
            .and_then(|y| y.broadcast_mul(&self.weight))
            .and_then(|y| y.broadcast_add(&self.bias))
            .map_err(ce)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// erf form (PyTorch `nn.GELU()`, transformers "gelu").
    Gelu,
    /// tanh approximation (transformers "gelu_new" / "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => {
                return Err(Error::value(format!(
                    "unsupported activation {s:?}; supported: gelu, gelu_new, gelu_pytorch_tanh, relu, silu"
                )))
            }
        })
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
        .map_err(ce)
    }
}

/// Softmax over the last axis, max-subtracted.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1).map_err(ce)?;
    let e = x.broadcast_sub(&m).map_err(ce)?.exp().map_err(ce)?;
    let s = e.sum_keepdim(D::Minus1).map_err(ce)?;
    e.broadcast_div(&s).map_err(ce)
}

/// Scaled dot-product attention of (batch, heads, len, dim) tensors; `bias` is added to the
/// scores (a mask as 0 / large negative), broadcast to (batch, heads, len_q, len_k).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(D::Minus1).map_err(ce)? as f64;
    let kt = k.transpose(2, 3).map_err(ce)?.contiguous().map_err(ce)?;
    let s =
        (q.contiguous().map_err(ce)?.matmul(&kt).map_err(ce)? * (1.0 / d.sqrt())).map_err(ce)?;
    let s = match bias {
        Some(b) => s.broadcast_add(b).map_err(ce)?,
        None => s,
    };
    softmax(&s)?
        .matmul(&v.contiguous().map_err(ce)?)
        .map_err(ce)
}

/// (batch, len, heads * dim) to (batch, heads, len, dim).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, h) = x.dims3().map_err(ce)?;
    x.reshape((b, l, heads, h / heads))
        .and_then(|t| t.transpose(1, 2))
        .map_err(ce)
}

/// (batch, heads, len, dim) back to (batch, len, heads * dim).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, nh, l, d) = x.dims4().map_err(ce)?;
    x.transpose(1, 2)
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((b, l, nh * d)))
        .map_err(ce)
}
