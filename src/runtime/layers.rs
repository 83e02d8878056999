//! Building blocks on candle tensors: linear layers (float or quantized at load time, with
//! optional int8 activations), embeddings, patch-embedding convolution, layer norm,
//! multi-head attention (self and cross, with masks) and pooling.
use super::ce;
pub use super::ops::Activation;
use super::ops::{self, tensor, with_f32, AttnShape};
use crate::bitnet::intgemm::{IntLinear, IntMatrix};
use crate::bitnet::linear::{BinaryLinear, TernaryLinear};
use crate::bitnet::quant::activation_quant;
use crate::bitnet::ternary::{Acts, RowFn};
use crate::names::string_enum;
use crate::ptq::Rotation;
use crate::quant::spec::{self, Granularity, QuantSpec, QuantizedTensor};
use crate::{ensure, Error, Result};
use candle_core::Tensor;
use ndarray::{ArrayView2, ArrayViewD};
use rayon::prelude::*;

/// How linear weights are stored and multiplied, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    F32,
    /// int8, symmetric, one scale per output channel: with 8-bit activations the W8A8 integer
    /// GEMM on the codes as stored, otherwise dequantized once for the float GEMM.
    Int8,
    /// int4, symmetric, one scale per group of 32 inputs: W4A8 on the integer GEMM (half a byte
    /// per weight in memory) with 8-bit activations, otherwise dequantized once.
    Int4,
    /// BitNet b1.58 ternary weights at 2 bits, int8 activations, the packed integer kernel.
    Ternary,
    /// XNOR-Net signs with per-row scales, binarized activations, the XNOR-popcount kernel.
    Binary,
}

string_enum!(WeightMode, "weights", {
    "f32" => F32,
    "int8" => Int8,
    "int4" => Int4,
    "ternary" => Ternary,
    "binary" => Binary,
});

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

/// The float32 elements of a tensor, copied.
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    with_f32(t, <[f32]>::to_vec)
}

enum Kernel {
    /// (out, in) as PyTorch stores it (dequantized once for weight-only integer modes).
    Float(Tensor),
    /// The same, packed once for the register-tiled float GEMM (CPUs with AVX2 + FMA).
    Packed(ops::PackedWeights),
    /// Integer codes as stored, int8 activations (W8A8, W4A8).
    Int(IntLinear),
    Ternary(TernaryLinear),
    Binary(BinaryLinear),
}

/// What a layer does to its input rows before its weights multiply them, for weights that
/// post-training quantization stored in another basis (`lowbit.ptq`): AWQ's per-input scales
/// (`x / s`), then a randomized Hadamard rotation (`x R`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InputTransform {
    pub scales: Option<Vec<f32>>,
    pub rotation: Option<Rotation>,
}

impl InputTransform {
    /// The transformed copy of `x`, rows of `k` values back to back.
    fn apply(&self, x: &[f32], k: usize) -> Result<Vec<f32>> {
        let mut v = x.to_vec();
        if let Some(s) = &self.scales {
            ensure!(s.len() == k, "{} input scales for {k} inputs", s.len());
            v.par_chunks_mut(k).for_each(|row| {
                row.iter_mut().zip(s).for_each(|(a, b)| *a /= b);
            });
        }
        if let Some(r) = &self.rotation {
            ensure!(
                r.features == k,
                "a rotation of {} features for {k} inputs",
                r.features
            );
            r.apply_f32(&mut v)?;
        }
        Ok(v)
    }
}

/// `y = x @ w.T + b` over the last axis, with the weights in one of the `WeightMode`s.
pub struct Linear {
    kernel: Kernel,
    bias: Option<Vec<f32>>,
    /// Per-token absmax activation quantization before a float kernel (BitNet's recipe).
    act_bits: Option<u32>,
    /// Applied to the input before everything else.
    input: Option<InputTransform>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// `w` is (out, in) as PyTorch stores it; `act_bits` quantizes the input rows first (see
    /// `with_act_bits`; with 8 bits the integer modes run the integer GEMM).
    pub fn new(
        w: Tensor,
        bias: Option<Tensor>,
        mode: WeightMode,
        act_bits: Option<u32>,
    ) -> Result<Self> {
        if mode.spec().is_some() {
            let (out_features, in_features) = w.dims2().map_err(ce)?;
            let q = with_f32(&w, |ws| {
                let wv = ArrayView2::from_shape((out_features, in_features), ws).expect("2-D");
                spec::quantize(ArrayViewD::from(wv.into_dyn()), mode.spec().unwrap(), None)
            })??;
            return Self::from_quantized(&q, bias, act_bits);
        }
        Self::build(w, bias, mode)?.with_act_bits(act_bits)
    }

    /// A layer on quantized weights as stored ((out, ...) flattened to (out, in)): the integer
    /// GEMM on their codes with 8-bit activations where the kernels take the spec (per tensor,
    /// per output channel, per group of inputs), else their values dequantized once.
    pub fn from_quantized(
        q: &QuantizedTensor,
        bias: Option<Tensor>,
        act_bits: Option<u32>,
    ) -> Result<Self> {
        ensure!(
            q.shape.len() >= 2,
            "a quantized weight of shape {:?} is not a matrix",
            q.shape
        );
        if Self::takes_integer_gemm(q, act_bits) {
            let b = bias.as_ref().map(to_vec).transpose()?;
            let t = IntLinear::new(q, b)?;
            return Ok(Linear {
                in_features: t.w.k,
                out_features: t.w.n,
                kernel: Kernel::Int(t),
                bias: None,
                act_bits,
                input: None,
            });
        }
        let (out, rest) = (q.shape[0], q.shape[1..].iter().product::<usize>());
        let deq = q.dequantize()?;
        let w = tensor(deq.into_raw_vec_and_offset().0, (out, rest))?;
        Self::build(w, bias, WeightMode::F32)?.with_act_bits(act_bits)
    }

    /// Whether `from_quantized` runs these weights on the integer GEMM (8-bit activations and a
    /// spec the kernels take) rather than on their dequantized values.
    pub fn takes_integer_gemm(q: &QuantizedTensor, act_bits: Option<u32>) -> bool {
        act_bits == Some(8) && IntMatrix::supports(q)
    }

    fn build(w: Tensor, bias: Option<Tensor>, mode: WeightMode) -> Result<Self> {
        let (out_features, in_features) = w.dims2().map_err(ce)?;
        let bias = bias.as_ref().map(to_vec).transpose()?;
        if let Some(b) = &bias {
            ensure!(
                b.len() == out_features,
                "bias has {} entries for {out_features} outputs",
                b.len()
            );
        }
        let kernel = with_f32(&w, |ws| -> Result<Kernel> {
            let wv = ArrayView2::from_shape((out_features, in_features), ws).expect("2-D");
            Ok(match mode {
                WeightMode::F32 | WeightMode::Int8 | WeightMode::Int4 => {
                    match ops::PackedWeights::new(ws, out_features, in_features) {
                        Some(p) => Kernel::Packed(p),
                        None => Kernel::Float(w.clone()),
                    }
                }
                WeightMode::Ternary => {
                    Kernel::Ternary(TernaryLinear::from_float(wv, bias.clone())?)
                }
                WeightMode::Binary => {
                    Kernel::Binary(BinaryLinear::from_float(wv, bias.clone(), true)?)
                }
            })
        })??;
        let bias = match kernel {
            // The integer kernels add the bias in their f64 epilogue.
            Kernel::Ternary(_) | Kernel::Binary(_) | Kernel::Int(_) => None,
            Kernel::Float(_) | Kernel::Packed(_) => bias,
        };
        Ok(Linear {
            kernel,
            bias,
            act_bits: None,
            input: None,
            in_features,
            out_features,
        })
    }

    /// A layer on stored ternary codes (the packed kernel, no re-quantization).
    pub fn from_ternary(t: TernaryLinear) -> Self {
        Linear {
            in_features: t.w.k,
            out_features: t.w.n,
            kernel: Kernel::Ternary(t),
            bias: None,
            act_bits: None,
            input: None,
        }
    }

    /// Transforms every input by `t` first (see [`InputTransform`]).
    pub fn with_input(mut self, t: InputTransform) -> Result<Self> {
        let k = self.in_features;
        if let Some(s) = &t.scales {
            ensure!(s.len() == k, "{} input scales for {k} inputs", s.len());
            ensure!(
                s.iter().all(|v| v.is_finite() && *v > 0.0),
                "input scales must be positive and finite"
            );
        }
        if let Some(r) = &t.rotation {
            ensure!(
                r.features == k,
                "a rotation of {} features for {k} inputs",
                r.features
            );
        }
        self.input = Some(t);
        Ok(self)
    }

    /// Quantizes the input rows to `bits`-bit integers per token (absmax, as BitNet does)
    /// before the float kernel. Ternary layers always use 8 bits; binary ones use signs.
    pub fn with_act_bits(mut self, bits: Option<u32>) -> Result<Self> {
        if let Some(b) = bits {
            ensure!(
                (2..=8).contains(&b),
                "act_bits must be between 2 and 8, got {b}"
            );
            match self.kernel {
                Kernel::Ternary(_) => ensure!(
                    b == 8,
                    "ternary layers quantize activations to 8 bits; act_bits={b} is not supported"
                ),
                Kernel::Binary(_) => {
                    return Err(Error::value(
                        "binary layers binarize their activations; act_bits does not apply",
                    ))
                }
                Kernel::Float(_) | Kernel::Packed(_) => self.act_bits = Some(b),
                Kernel::Int(_) => ensure!(b == 8, "integer layers take 8-bit activations"),
            }
        }
        Ok(self)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None)
    }

    /// `act(x @ w.T + b)`, the activation fused into the same pass over the output.
    pub fn forward_act(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let k = self.in_features;
        if let Some(t) = &self.input {
            let x = tensor(with_f32(x, |xs| t.apply(xs, k))??, x.dims())?;
            return self.forward_own(&x, act);
        }
        self.forward_own(x, act)
    }

    /// `forward_act` on inputs already in the weights' basis.
    fn forward_own(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let k = self.in_features;
        let (mut dims, rows) = input_rows(x, k)?;
        let n = self.out_features;
        // After the float and binary kernels, one parallel pass over the output.
        let after = |mut y: Vec<f32>| {
            if let Some(a) = act {
                a.apply(&mut y);
            }
            y
        };
        let y = with_f32(x, |xs| -> Result<Vec<f32>> {
            let xv = ArrayView2::from_shape((rows, k), xs).expect("rows x k");
            Ok(match &self.kernel {
                Kernel::Packed(p) => {
                    let mut quantized = Vec::new();
                    let xs = self.float_input(xv, xs, &mut quantized)?;
                    after(p.linear(xs, self.bias.as_deref()))
                }
                Kernel::Float(w) => {
                    let mut quantized = Vec::new();
                    let xs = self.float_input(xv, xs, &mut quantized)?;
                    after(with_f32(w, |ws| {
                        ops::linear(xs, k, ws, n, self.bias.as_deref())
                    })?)
                }
                Kernel::Ternary(t) => {
                    // The activation runs inside the kernel's tasks, on rows still in cache.
                    let post = act.map(|a| move |row: &mut [f32]| a.apply_seq(row));
                    let post = post.as_ref().map(|p| p as &RowFn);
                    t.forward_post(xv, post)?.into_raw_vec_and_offset().0
                }
                Kernel::Int(t) => {
                    let post = act.map(|a| move |row: &mut [f32]| a.apply_seq(row));
                    let post = post.as_ref().map(|p| p as &RowFn);
                    t.forward_post(xv, post)?.into_raw_vec_and_offset().0
                }
                Kernel::Binary(b) => after(b.forward(xv)?.into_raw_vec_and_offset().0),
            })
        })??;
        *dims.last_mut().unwrap() = n;
        tensor(y, dims)
    }
}

impl Linear {
    /// A float kernel's input: `xs` itself, or with `act_bits` its per-token fake-quantized
    /// values (written into `buf`).
    fn float_input<'a>(
        &self,
        xv: ArrayView2<'_, f32>,
        xs: &'a [f32],
        buf: &'a mut Vec<f32>,
    ) -> Result<&'a [f32]> {
        Ok(match self.act_bits {
            Some(bits) => {
                let (q, s) = activation_quant(xv, bits)?;
                *buf = fake_quant_rows(q.view(), &s);
                &buf[..]
            }
            None => xs,
        })
    }
}

/// The shape of `x` and its number of rows of `k` features (the last axis), for a linear layer.
fn input_rows(x: &Tensor, k: usize) -> Result<(Vec<usize>, usize)> {
    let dims = x.dims().to_vec();
    ensure!(
        dims.last() == Some(&k),
        "linear layer expects {k} input features, got shape {dims:?}"
    );
    Ok((dims, x.elem_count() / k.max(1)))
}

/// `forward` of layers that share one input: the input is quantized once when they are all
/// ternary (the same codes each would make).
pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
    let ternary: Option<Vec<&TernaryLinear>> = layers
        .iter()
        .map(|l| match &l.kernel {
            Kernel::Ternary(t) if l.in_features == layers[0].in_features && l.input.is_none() => {
                Some(t)
            }
            _ => None,
        })
        .collect();
    let (Some(ts), Some(first)) = (ternary, layers.first()) else {
        return layers.iter().map(|l| l.forward(x)).collect();
    };
    let k = first.in_features;
    let (mut dims, rows) = input_rows(x, k)?;
    let (acts, sx) = with_f32(x, |xs| {
        Acts::quantize(ArrayView2::from_shape((rows, k), xs).expect("rows x k"))
    })??;
    ts.iter()
        .map(|t| {
            *dims.last_mut().unwrap() = t.w.n;
            let y = t.forward_acts(&acts, &sx, None)?;
            tensor(y.into_raw_vec_and_offset().0, dims.clone())
        })
        .collect()
}

/// `q / s` row by row: the float values an activation quantizer hands to a float kernel.
fn fake_quant_rows(q: ArrayView2<'_, i8>, s: &[f32]) -> Vec<f32> {
    let k = q.ncols();
    let q = q.as_slice().expect("fresh arrays are contiguous");
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(k.max(1))
        .zip(q.par_chunks(k.max(1)))
        .zip(s.par_iter())
        .for_each(|((o, q), &s)| o.iter_mut().zip(q).for_each(|(o, &q)| *o = q as f32 / s));
    out
}

pub struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    pub fn new(weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Self> {
        let (weight, bias) = (to_vec(weight)?, to_vec(bias)?);
        ensure!(
            weight.len() == bias.len() && !weight.is_empty(),
            "layer norm weight and bias differ in size"
        );
        Ok(LayerNorm {
            weight,
            bias,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `LayerNorm(x + residual)` in one pass (post-norm transformer blocks).
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let h = self.weight.len();
        ensure!(
            x.dims().last() == Some(&h),
            "layer norm over {h} features got shape {:?}",
            x.dims()
        );
        let y = with_f32(x, |xs| match residual {
            Some(r) => {
                ensure!(
                    r.dims() == x.dims(),
                    "residual shape {:?} differs from {:?}",
                    r.dims(),
                    x.dims()
                );
                with_f32(r, |rs| {
                    ops::layer_norm(xs, Some(rs), &self.weight, &self.bias, self.eps)
                })
            }
            None => Ok(ops::layer_norm(
                xs,
                None,
                &self.weight,
                &self.bias,
                self.eps,
            )),
        })??;
        tensor(y, x.dims())
    }
}

/// A lookup table of rows (token, position or type embeddings).
pub struct Embedding {
    table: Tensor,
    pub rows: usize,
    pub dim: usize,
}

impl Embedding {
    pub fn new(table: Tensor) -> Result<Self> {
        let (rows, dim) = table.dims2().map_err(ce)?;
        Ok(Embedding { table, rows, dim })
    }

    /// Rows `ids` of the table, shaped `shape + [dim]`; an id outside the table is an error.
    pub fn forward(&self, ids: &[i64], shape: &[usize]) -> Result<Tensor> {
        ensure!(
            shape.iter().product::<usize>() == ids.len(),
            "ids have {} entries for shape {shape:?}",
            ids.len()
        );
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= self.rows) {
            return Err(Error::value(format!(
                "id {bad} is outside the embedding table of {} rows",
                self.rows
            )));
        }
        let d = self.dim;
        let mut out = vec![0f32; ids.len() * d];
        with_f32(&self.table, |t| {
            out.par_chunks_mut(d.max(1))
                .zip(ids.par_iter())
                .for_each(|(o, &i)| o.copy_from_slice(&t[i as usize * d..(i as usize + 1) * d]))
        })?;
        let mut dims = shape.to_vec();
        dims.push(d);
        tensor(out, dims)
    }

    /// The first `n` rows (positions 0..n).
    pub fn first(&self, n: usize) -> Result<Tensor> {
        ensure!(
            n <= self.rows,
            "{n} positions exceed the table's {}",
            self.rows
        );
        self.table.narrow(0, 0, n).map_err(ce)
    }
}

/// A 2-D convolution by im2col and the (possibly quantized) linear kernel: weights
/// (out, in, kh, kw), no dilation, no groups. Patch embeddings are its stride = kernel case.
pub struct Conv2d {
    proj: Linear,
    pub channels: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl Conv2d {
    pub fn new(
        w: Tensor,
        bias: Option<Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        mode: WeightMode,
    ) -> Result<Self> {
        let (out, channels, kh, kw) = w.dims4().map_err(ce)?;
        let flat = w.reshape((out, channels * kh * kw)).map_err(ce)?;
        Self::from_linear(
            Linear::new(flat, bias, mode, None)?,
            channels,
            (kh, kw),
            stride,
            padding,
        )
    }

    /// A convolution over an already built linear layer of the flattened weights
    /// (out, channels * kh * kw), e.g. one on stored ternary codes.
    pub fn from_linear(
        proj: Linear,
        channels: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        ensure!(stride.0 > 0 && stride.1 > 0, "stride must be positive");
        ensure!(
            proj.in_features == channels * kernel.0 * kernel.1,
            "a {}x{} kernel over {channels} channels needs {} inputs, the layer has {}",
            kernel.0,
            kernel.1,
            channels * kernel.0 * kernel.1,
            proj.in_features
        );
        Ok(Conv2d {
            proj,
            channels,
            kernel,
            stride,
            padding,
        })
    }

    /// Output height and width for an input of `h` x `w`.
    pub fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (ph, pw) = (h + 2 * self.padding.0, w + 2 * self.padding.1);
        ensure!(
            ph >= self.kernel.0 && pw >= self.kernel.1,
            "input {h}x{w} is smaller than the kernel {:?}",
            self.kernel
        );
        Ok((
            (ph - self.kernel.0) / self.stride.0 + 1,
            (pw - self.kernel.1) / self.stride.1 + 1,
        ))
    }

    /// Images (batch, channels, h, w) to tokens (batch, oh * ow, out), row-major over the
    /// output grid: what ViT's `proj(x).flatten(2).transpose(1, 2)` gives.
    pub fn forward_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4().map_err(ce)?;
        ensure!(
            c == self.channels,
            "convolution expects {} channels, got {c}",
            self.channels
        );
        let (oh, ow) = self.out_size(h, w)?;
        let (kh, kw) = self.kernel;
        let cols = c * kh * kw;
        let mut patches = vec![0f32; b * oh * ow * cols];
        with_f32(x, |xs| {
            patches
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(r, row)| {
                    let (bi, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
                    for ci in 0..c {
                        for ky in 0..kh {
                            let y = (oy * self.stride.0 + ky) as isize - self.padding.0 as isize;
                            for kx in 0..kw {
                                let xx =
                                    (ox * self.stride.1 + kx) as isize - self.padding.1 as isize;
                                let inside =
                                    y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w;
                                row[(ci * kh + ky) * kw + kx] = if inside {
                                    xs[((bi * c + ci) * h + y as usize) * w + xx as usize]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                })
        })?;
        self.proj.forward(&tensor(patches, (b, oh * ow, cols))?)
    }

    /// (batch, out, oh, ow), as `nn.Conv2d` returns.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4().map_err(ce)?;
        let (oh, ow) = self.out_size(h, w)?;
        let t = self.forward_tokens(x)?;
        let (b, _, o) = t.dims3().map_err(ce)?;
        t.transpose(1, 2)
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((b, o, oh, ow)))
            .map_err(ce)
    }
}

/// The columns of a (batch, len) key mask up to the last one some row attends to (at least
/// one). The trailing all-padding columns get weight exactly 0 in every row that attends to
/// anything (`exp` of the most negative float is 0) and a query's output depends on no other
/// query, so outputs pooled over unmasked tokens, or read from the first, are the same
/// without them (to the rounding of a softmax sum split differently over its SIMD lanes):
/// shorter texts in a padded batch cost less.
pub fn used_len(mask: ArrayView2<'_, i64>) -> usize {
    (0..mask.ncols())
        .rev()
        .find(|&j| mask.column(j).iter().any(|&m| m != 0))
        .map_or(1, |j| j + 1)
}

/// Additive attention bias from a (batch, len) 0/1 key mask: 0 where 1, the most negative
/// float where 0 (what transformers adds).
pub fn mask_bias(mask: &[i64]) -> Vec<f32> {
    mask.iter()
        .map(|&v| if v != 0 { 0.0 } else { f32::MIN })
        .collect()
}

/// Multi-head attention with its query, key and value projections; self-attention when no
/// context is given, cross-attention over the context (image tokens, say) otherwise. The
/// output projection is the caller's, so the context vectors can be recorded before it.
pub struct MultiHeadAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub heads: usize,
}

impl MultiHeadAttention {
    pub fn new(q: Linear, k: Linear, v: Linear, heads: usize) -> Result<Self> {
        let h = q.out_features;
        ensure!(
            heads > 0 && h.is_multiple_of(heads),
            "width {h} is not a multiple of {heads} heads"
        );
        ensure!(
            k.out_features == h && v.out_features == h && k.in_features == v.in_features,
            "query, key and value projections disagree in size"
        );
        Ok(MultiHeadAttention { q, k, v, heads })
    }

    /// `x` (batch, lq, width) attends to `context` (batch, lk, width_ctx), or to itself.
    /// `key_bias` (batch * lk) is added to the scores (see `mask_bias`); `causal` hides later
    /// keys. Returns the merged heads (batch, lq, width).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        key_bias: Option<&[f32]>,
        causal: bool,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let (b, lq, _) = x.dims3().map_err(ce)?;
        let (bk, lk, _) = ctx.dims3().map_err(ce)?;
        ensure!(b == bk, "queries have batch {b}, context {bk}");
        if let Some(m) = key_bias {
            ensure!(
                m.len() == b * lk,
                "key mask has {} entries for ({b}, {lk})",
                m.len()
            );
        }
        let mut qkv = match context {
            None => forward_shared(&[&self.q, &self.k, &self.v], x)?,
            Some(c) => {
                let mut kv = forward_shared(&[&self.k, &self.v], c)?;
                kv.insert(0, self.q.forward(x)?);
                kv
            }
        }
        .into_iter();
        let (q, k, v) = (
            qkv.next().expect("three projections"),
            qkv.next().expect("three projections"),
            qkv.next().expect("three projections"),
        );
        let h = self.q.out_features;
        let shape = AttnShape {
            batch: b,
            lq,
            lk,
            heads: self.heads,
            dim: h / self.heads,
        };
        let out = with_f32(&q, |q| {
            with_f32(&k, |k| {
                with_f32(&v, |v| ops::attention(q, k, v, shape, key_bias, causal))
            })
        })???;
        tensor(out, (b, lq, h))
    }
}

/// Mean over the unmasked tokens of (batch, len, dim) (all tokens without a mask).
pub fn mean_pool(x: &Tensor, mask: Option<&[i64]>) -> Result<Tensor> {
    let (b, l, d) = x.dims3().map_err(ce)?;
    if let Some(m) = mask {
        ensure!(
            m.len() == b * l,
            "mask has {} entries for ({b}, {l})",
            m.len()
        );
    }
    let out = with_f32(x, |xs| {
        let mut out = vec![0f32; b * d];
        for (bi, o) in out.chunks_exact_mut(d).enumerate() {
            let mut count = 0f32;
            for t in 0..l {
                let w = mask.map_or(1.0, |m| m[bi * l + t] as f32);
                if w != 0.0 {
                    let row = &xs[(bi * l + t) * d..(bi * l + t + 1) * d];
                    o.iter_mut().zip(row).for_each(|(o, v)| *o += v * w);
                    count += w;
                }
            }
            let c = count.max(1e-9);
            o.iter_mut().for_each(|v| *v /= c);
        }
        out
    })?;
    tensor(out, (b, d))
}

/// Each row of (rows, dim) divided by its L2 norm (at least 1e-12), as `F.normalize`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let d = *x
        .dims()
        .last()
        .ok_or_else(|| Error::value("cannot normalize a scalar"))?;
    let out = with_f32(x, |xs| {
        let mut out = xs.to_vec();
        for row in out.chunks_exact_mut(d.max(1)) {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= n);
        }
        out
    })?;
    tensor(out, x.dims())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn det(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1013) as f32 / 506.5) - 1.0)
            .collect()
    }

    /// The activation fused into the ternary kernel's tasks gives the bits of applying it after,
    /// on the GEMV and the panel paths.
    #[test]
    fn fused_activation_equals_applying_it_after() {
        let (k, n) = (200, 70);
        let w = tensor(det(n * k, 4), (n, k)).unwrap();
        let lin = Linear::new(
            w,
            Some(tensor(det(n, 5), n).unwrap()),
            WeightMode::Ternary,
            None,
        )
        .unwrap();
        for rows in [1, 3, 40] {
            let x = tensor(det(rows * k, rows), (rows, k)).unwrap();
            for act in [
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::Relu,
                Activation::Silu,
            ] {
                let fused = to_vec(&lin.forward_act(&x, Some(act)).unwrap()).unwrap();
                let mut after = to_vec(&lin.forward(&x).unwrap()).unwrap();
                act.apply(&mut after);
                assert_eq!(fused, after, "{act:?}, {rows} rows");
            }
        }
    }

    /// Layers sharing one quantized input give the bits of separate forwards, ternary or not.
    #[test]
    fn shared_input_equals_separate_forwards() {
        let k = 150;
        let layer = |n, seed, mode| {
            let w = tensor(det(n * k, seed), (n, k)).unwrap();
            Linear::new(w, Some(tensor(det(n, seed + 1), n).unwrap()), mode, None).unwrap()
        };
        for mode in [WeightMode::Ternary, WeightMode::F32] {
            let ls = [layer(20, 1, mode), layer(33, 3, mode), layer(7, 5, mode)];
            let refs: Vec<&Linear> = ls.iter().collect();
            for rows in [1, 2, 50] {
                let x = tensor(det(2 * rows * k, rows), (2, rows, k)).unwrap();
                let shared = forward_shared(&refs, &x).unwrap();
                for (l, y) in ls.iter().zip(&shared) {
                    let want = l.forward(&x).unwrap();
                    assert_eq!(y.dims(), want.dims());
                    assert_eq!(to_vec(y).unwrap(), to_vec(&want).unwrap(), "{mode:?}");
                }
            }
        }
    }

    #[test]
    fn conv2d_matches_a_direct_convolution() {
        let (b, c, h, w, o, kh, kw) = (2, 3, 9, 7, 5, 3, 2);
        let x = det(b * c * h * w, 1);
        let wt = det(o * c * kh * kw, 2);
        let bias = det(o, 3);
        for (stride, pad) in [((1, 1), (0, 0)), ((2, 3), (1, 1)), ((3, 2), (2, 0))] {
            let conv = Conv2d::new(
                tensor(wt.clone(), (o, c, kh, kw)).unwrap(),
                Some(tensor(bias.clone(), o).unwrap()),
                stride,
                pad,
                WeightMode::F32,
            )
            .unwrap();
            let y = conv
                .forward(&tensor(x.clone(), (b, c, h, w)).unwrap())
                .unwrap();
            let (oh, ow) = conv.out_size(h, w).unwrap();
            assert_eq!(y.dims(), &[b, o, oh, ow]);
            let y = to_vec(&y).unwrap();
            for bi in 0..b {
                for oc in 0..o {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let mut want = bias[oc] as f64;
                            for ci in 0..c {
                                for ky in 0..kh {
                                    for kx in 0..kw {
                                        let iy = (oy * stride.0 + ky) as isize - pad.0 as isize;
                                        let ix = (ox * stride.1 + kx) as isize - pad.1 as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        want += x
                                            [((bi * c + ci) * h + iy as usize) * w + ix as usize]
                                            as f64
                                            * wt[((oc * c + ci) * kh + ky) * kw + kx] as f64;
                                    }
                                }
                            }
                            let got = y[((bi * o + oc) * oh + oy) * ow + ox] as f64;
                            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                        }
                    }
                }
            }
        }
        let conv = Conv2d::new(
            tensor(wt, (o, c, kh, kw)).unwrap(),
            None,
            (1, 1),
            (0, 0),
            WeightMode::F32,
        )
        .unwrap();
        let small = Tensor::zeros((1, c, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(conv
            .forward(&small)
            .unwrap_err()
            .to_string()
            .contains("smaller than the kernel"));
        let wrong = Tensor::zeros((1, c + 1, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(conv
            .forward(&wrong)
            .unwrap_err()
            .to_string()
            .contains("channels"));
    }

    #[test]
    fn cross_attention_and_embeddings() {
        let (b, lq, lk, width, heads) = (2, 3, 5, 8, 2);
        let eye = |n: usize| {
            let mut v = vec![0f32; n * n];
            (0..n).for_each(|i| v[i * n + i] = 1.0);
            tensor(v, (n, n)).unwrap()
        };
        let lin = || Linear::new(eye(width), None, WeightMode::F32, None).unwrap();
        let mha = MultiHeadAttention::new(lin(), lin(), lin(), heads).unwrap();
        let x = tensor(det(b * lq * width, 4), (b, lq, width)).unwrap();
        let ctx = tensor(det(b * lk * width, 5), (b, lk, width)).unwrap();
        let mut bias = vec![0f32; b * lk];
        bias[lk + 4] = f32::MIN;
        let y = mha.forward(&x, Some(&ctx), Some(&bias), false).unwrap();
        let want = ops::attention(
            &to_vec(&x).unwrap(),
            &to_vec(&ctx).unwrap(),
            &to_vec(&ctx).unwrap(),
            AttnShape {
                batch: b,
                lq,
                lk,
                heads,
                dim: width / heads,
            },
            Some(&bias),
            false,
        );
        assert_eq!(to_vec(&y).unwrap(), want);
        assert!(mha
            .forward(&x, Some(&ctx), Some(&bias[1..]), false)
            .is_err());
        let emb = Embedding::new(tensor(det(10 * 4, 6), (10, 4)).unwrap()).unwrap();
        let e = emb.forward(&[3, 0, 9], &[3]).unwrap();
        assert_eq!(to_vec(&e).unwrap()[4..8], det(40, 6)[0..4]);
        assert!(emb
            .forward(&[10], &[1])
            .unwrap_err()
            .to_string()
            .contains("outside"));
        assert!(emb.forward(&[-1], &[1]).is_err());
    }
}
