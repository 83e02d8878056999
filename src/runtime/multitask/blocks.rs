//! The layers the encoder and both decoders are built from: attention with its output
//! projection, the pre-LN block, the token decoder; and the loader that builds them.
use super::super::inputs::{check_tokens, MULTITASK};
use super::super::layers::{
    mask_bias, Activation, Embedding, LayerNorm, Linear, MultiHeadAttention, WeightMode,
};
use super::super::ops::add;
use super::super::weights::{Scope, Weights};
use super::super::{ce, Recorder};
use crate::{ensure, Result};
use candle_core::Tensor;
use ndarray::ArrayView2;

/// How the model builds its layers: every `nn.Linear` with `mode` and `act_bits`.
pub(super) struct Loader {
    pub(super) mode: WeightMode,
    pub(super) act_bits: Option<u32>,
    pub(super) eps: f64,
}

impl Loader {
    pub(super) fn linear(&self, s: &Scope<'_>) -> Result<Linear> {
        s.linear(self.mode, self.act_bits)
    }

    pub(super) fn norm(&self, s: &Scope<'_>) -> Result<LayerNorm> {
        s.layer_norm(self.eps)
    }

    pub(super) fn attention(&self, s: &Scope<'_>, heads: usize) -> Result<Attention> {
        Ok(Attention {
            mha: MultiHeadAttention::new(
                self.linear(&s.pp("q"))?,
                self.linear(&s.pp("k"))?,
                self.linear(&s.pp("v"))?,
                heads,
            )?,
            out: self.linear(&s.pp("out"))?,
        })
    }

    pub(super) fn block(&self, s: &Scope<'_>, heads: usize, cross: bool) -> Result<Block> {
        Ok(Block {
            norm1: self.norm(&s.pp("norm1"))?,
            attn: self.attention(&s.pp("attn"), heads)?,
            cross: if cross {
                Some((
                    self.norm(&s.pp("norm_cross"))?,
                    self.attention(&s.pp("cross"), heads)?,
                ))
            } else {
                None
            },
            norm2: self.norm(&s.pp("norm2"))?,
            fc1: self.linear(&s.pp("mlp").pp("fc1"))?,
            fc2: self.linear(&s.pp("mlp").pp("fc2"))?,
            name: s.prefix().module(),
        })
    }

    /// The decoder `name` of `w`.
    pub(super) fn decoder(
        &self,
        w: &Weights,
        name: &'static str,
        depth: usize,
        heads: usize,
    ) -> Result<Decoder> {
        let s = w.pp(name);
        Ok(Decoder {
            embed: s.pp("embed").embedding()?,
            pos: s.pp("pos").embedding()?,
            blocks: (0..depth)
                .map(|i| self.block(&s.pp("blocks").pp(i), heads, true))
                .collect::<Result<_>>()?,
            norm: self.norm(&s.pp("norm"))?,
            head: self.linear(&s.pp("head"))?,
            name,
        })
    }
}

/// Multi-head attention and its output projection.
pub(super) struct Attention {
    pub(super) mha: MultiHeadAttention,
    pub(super) out: Linear,
}

impl Attention {
    /// Records the context vectors as the input of `{name}.out` (see `INPUT`).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        key_bias: Option<&[f32]>,
        causal: bool,
        name: impl FnOnce() -> String,
        rec: &mut Recorder<'_>,
    ) -> Result<Tensor> {
        let c = self.mha.forward(x, ctx, key_bias, causal)?;
        rec.add(|| format!("{}.out{INPUT}", name()), &c);
        self.out.forward(&c)
    }
}

/// Suffix of a recorded tensor that is the input of the named module, not its output: what
/// the runtime fed a quantized layer after a step it does not record on its own (the
/// attention context, the MLP's activation), for `lowbit.crossval`'s isolated comparison.
pub const INPUT: &str = ":input";

/// Pre-LayerNorm block: self-attention, optional cross-attention, GELU MLP.
pub(super) struct Block {
    pub(super) name: String,
    pub(super) norm1: LayerNorm,
    pub(super) attn: Attention,
    pub(super) cross: Option<(LayerNorm, Attention)>,
    pub(super) norm2: LayerNorm,
    pub(super) fc1: Linear,
    pub(super) fc2: Linear,
}

impl Block {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        key_bias: Option<&[f32]>,
        causal: bool,
        rec: &mut Recorder<'_>,
    ) -> Result<Tensor> {
        let n = &self.name;
        let h = self.norm1.forward(x)?;
        rec.add(|| format!("{n}.norm1"), &h);
        let a = self
            .attn
            .forward(&h, None, key_bias, causal, || format!("{n}.attn"), rec)?;
        rec.add(|| format!("{n}.attn"), &a);
        let mut x = add(x, &a)?;
        if let (Some((norm, cross)), Some(ctx)) = (&self.cross, ctx) {
            let h = norm.forward(&x)?;
            rec.add(|| format!("{n}.norm_cross"), &h);
            let c = cross.forward(&h, Some(ctx), None, false, || format!("{n}.cross"), rec)?;
            rec.add(|| format!("{n}.cross"), &c);
            x = add(&x, &c)?;
        }
        let h = self.norm2.forward(&x)?;
        rec.add(|| format!("{n}.norm2"), &h);
        let f = self.fc1.forward_act(&h, Some(Activation::Gelu))?;
        rec.add(|| format!("{n}.mlp.fc2{INPUT}"), &f);
        let m = self.fc2.forward(&f)?;
        rec.add(|| format!("{n}.mlp"), &m);
        let x = add(&x, &m)?;
        rec.add(|| n.clone(), &x);
        Ok(x)
    }
}

/// Token and position embeddings, cross-attending blocks, a norm and a linear head (the
/// caption and VQA heads).
pub(super) struct Decoder {
    pub(super) name: &'static str,
    pub(super) embed: Embedding,
    pub(super) pos: Embedding,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: LayerNorm,
    pub(super) head: Linear,
}

impl Decoder {
    /// Checks `ids` against the vocabulary and the position table, and `mask` against `ids`.
    pub(super) fn check(
        &self,
        ids: ArrayView2<'_, i64>,
        mask: Option<ArrayView2<'_, i64>>,
    ) -> Result<()> {
        check_tokens(ids, mask, self.embed.rows, self.pos.rows, &MULTITASK)
    }

    /// The normed hidden states (batch, len, width) of `ids` attending to the image tokens.
    pub(super) fn hidden(
        &self,
        tokens: &Tensor,
        ids: ArrayView2<'_, i64>,
        mask: Option<ArrayView2<'_, i64>>,
        causal: bool,
        rec: &mut Recorder<'_>,
    ) -> Result<Tensor> {
        self.check(ids, mask)?;
        let (b, l) = ids.dim();
        let (bt, _, _) = tokens.dims3().map_err(ce)?;
        ensure!(b == bt, "ids have batch {b} but the images batch {bt}");
        let ids_v: Vec<i64> = ids.iter().copied().collect();
        let bias = mask.map(|m| mask_bias(&m.iter().copied().collect::<Vec<_>>()));
        let e = self.embed.forward(&ids_v, &[b, l])?;
        let name = self.name;
        rec.add(|| format!("{name}.embed"), &e);
        let mut x = add(&e, &self.pos.first(l)?)?;
        for blk in &self.blocks {
            x = blk.forward(&x, Some(tokens), bias.as_deref(), causal, rec)?;
        }
        let x = self.norm.forward(&x)?;
        rec.add(|| format!("{name}.norm"), &x);
        Ok(x)
    }
}
