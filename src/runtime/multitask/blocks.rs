//! The layers the encoder and both decoders are built from: attention with its output
//! projection, the pre-LN block, the token decoder; and the loader that builds them.
use super::super::layers::{
    mask_bias, Activation, Embedding, LayerNorm, Linear, MultiHeadAttention, WeightMode,
};
use super::super::ops::add;
use super::super::weights::Weights;
use super::super::{ce, Recorder};
use crate::{ensure, Error, Result};
use candle_core::Tensor;
use ndarray::ArrayView2;

/// Everything the model builds its layers with.
pub(super) struct Loader<'a> {
    pub(super) w: &'a Weights,
    pub(super) mode: WeightMode,
    pub(super) act_bits: Option<u32>,
    pub(super) eps: f64,
}

impl Loader<'_> {
    pub(super) fn linear(&self, n: &str) -> Result<Linear> {
        self.w.linear(
            &format!("{n}.weight"),
            Some(&format!("{n}.bias")),
            self.mode,
            self.act_bits,
        )
    }

    pub(super) fn norm(&self, n: &str) -> Result<LayerNorm> {
        LayerNorm::new(
            &self.w.get(&format!("{n}.weight"))?,
            &self.w.get(&format!("{n}.bias"))?,
            self.eps,
        )
    }

    pub(super) fn attention(&self, n: &str, heads: usize) -> Result<Attention> {
        Ok(Attention {
            mha: MultiHeadAttention::new(
                self.linear(&format!("{n}.q"))?,
                self.linear(&format!("{n}.k"))?,
                self.linear(&format!("{n}.v"))?,
                heads,
            )?,
            out: self.linear(&format!("{n}.out"))?,
        })
    }

    pub(super) fn block(&self, name: String, heads: usize, cross: bool) -> Result<Block> {
        Ok(Block {
            norm1: self.norm(&format!("{name}.norm1"))?,
            attn: self.attention(&format!("{name}.attn"), heads)?,
            cross: if cross {
                Some((
                    self.norm(&format!("{name}.norm_cross"))?,
                    self.attention(&format!("{name}.cross"), heads)?,
                ))
            } else {
                None
            },
            norm2: self.norm(&format!("{name}.norm2"))?,
            fc1: self.linear(&format!("{name}.mlp.fc1"))?,
            fc2: self.linear(&format!("{name}.mlp.fc2"))?,
            name,
        })
    }

    pub(super) fn decoder(
        &self,
        name: &'static str,
        depth: usize,
        heads: usize,
    ) -> Result<Decoder> {
        Ok(Decoder {
            embed: Embedding::new(self.w.get(&format!("{name}.embed.weight"))?)?,
            pos: Embedding::new(self.w.get(&format!("{name}.pos.weight"))?)?,
            blocks: (0..depth)
                .map(|i| self.block(format!("{name}.blocks.{i}"), heads, true))
                .collect::<Result<_>>()?,
            norm: self.norm(&format!("{name}.norm"))?,
            head: self.linear(&format!("{name}.head"))?,
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
        let (b, l) = ids.dim();
        ensure!(b > 0 && l > 0, "ids are empty: shape ({b}, {l})");
        ensure!(
            l <= self.pos.rows,
            "{l} tokens exceed the maximum of {}",
            self.pos.rows
        );
        if let Some(bad) = ids
            .iter()
            .find(|&&i| i < 0 || i as usize >= self.embed.rows)
        {
            return Err(Error::value(format!(
                "ids contain {bad}, outside the vocabulary 0..{}",
                self.embed.rows
            )));
        }
        if let Some(m) = mask {
            ensure!(
                m.dim() == (b, l),
                "mask has shape {:?}, ids ({b}, {l})",
                m.dim()
            );
            ensure!(
                m.iter().all(|&v| v == 0 || v == 1),
                "mask must contain only 0 and 1"
            );
        }
        Ok(())
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
