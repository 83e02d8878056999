//! The multi-task vision-language model of `lowbit.models.MultiTaskVLM`: a pre-LN ViT encoder
//! shared by four heads (caption decoder, OCR over the patch-grid columns, VQA question encoder,
//! retrieval projections with a BERT text tower), loaded from the file `lowbit.models.save`
//! writes. Each task runs only its own head; layers are recorded under the names of the torch
//! model's `named_modules()`.
use super::bert::{BertConfig, BertEncoder};
use super::layers::{
    l2_normalize, mask_bias, mean_pool, to_vec, used_len, Activation, Conv2d, Embedding, LayerNorm,
    Linear, MultiHeadAttention, WeightMode,
};
use super::ops::{add, tensor};
use super::weights::Weights;
use super::{ce, Record, Recorder};
use crate::{ensure, Error, Result};
use candle_core::Tensor;
use ndarray::{s, Array2, ArrayView2, ArrayView4, CowArray, Ix2};
use serde::Deserialize;
use std::path::Path;

/// Metadata key of the config in a saved model file (`lowbit.models.CONFIG_KEY`).
pub const CONFIG_KEY: &str = "lowbit.multitask";

/// The sizes of the model: the fields of `lowbit.models.MultiTaskConfig`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiTaskConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    pub decoder_depth: usize,
    pub vqa_depth: usize,
    pub vocab_size: usize,
    pub max_caption_len: usize,
    pub max_question_len: usize,
    pub max_text_len: usize,
    pub charset: String,
    pub ocr_steps: usize,
    pub answers: Vec<String>,
    pub embed_dim: usize,
    pub layer_norm_eps: f64,
    pub pad_id: i64,
    pub bos_id: i64,
    pub eos_id: i64,
    pub cls_id: i64,
    pub text: BertConfig,
}

impl MultiTaskConfig {
    /// Parses and validates `MultiTaskConfig.to_json()` (the same checks as the dataclass).
    pub fn from_json(text: &str) -> Result<Self> {
        let c: MultiTaskConfig = serde_json::from_str(text)
            .map_err(|e| Error::format(format!("bad {CONFIG_KEY} config JSON: {e}")))?;
        for (name, v) in [
            ("image_size", c.image_size),
            ("patch_size", c.patch_size),
            ("channels", c.channels),
            ("width", c.width),
            ("depth", c.depth),
            ("heads", c.heads),
            ("mlp_ratio", c.mlp_ratio),
            ("decoder_depth", c.decoder_depth),
            ("vqa_depth", c.vqa_depth),
            ("vocab_size", c.vocab_size),
            ("max_caption_len", c.max_caption_len),
            ("max_question_len", c.max_question_len),
            ("max_text_len", c.max_text_len),
            ("ocr_steps", c.ocr_steps),
            ("embed_dim", c.embed_dim),
        ] {
            ensure!(
                v >= 1,
                "MultiTaskConfig.{name} must be a positive int, got {v}"
            );
        }
        ensure!(
            c.image_size % c.patch_size == 0,
            "image_size {} is not a multiple of patch_size {}",
            c.image_size,
            c.patch_size
        );
        ensure!(
            c.width % c.heads == 0,
            "width {} is not a multiple of heads {}",
            c.width,
            c.heads
        );
        ensure!(
            !c.charset.is_empty() && !c.answers.is_empty(),
            "charset and answers must not be empty"
        );
        let eps_positive = c.layer_norm_eps > 0.0;
        ensure!(
            eps_positive,
            "layer_norm_eps must be positive, got {}",
            c.layer_norm_eps
        );
        for (name, id) in [
            ("pad_id", c.pad_id),
            ("bos_id", c.bos_id),
            ("eos_id", c.eos_id),
            ("cls_id", c.cls_id),
        ] {
            ensure!(
                (0..c.vocab_size as i64).contains(&id),
                "{name} {id} is outside the vocabulary 0..{}",
                c.vocab_size
            );
        }
        c.text.validate()?;
        Ok(c)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// CTC classes: the characters and the blank (0).
    pub fn ocr_classes(&self) -> usize {
        self.charset.chars().count() + 1
    }

    /// Every tensor of `MultiTaskVLM().state_dict()`, with its shape.
    pub fn expected(&self) -> Vec<(String, Vec<usize>)> {
        let (w, p, g) = (self.width, self.patch_size, self.grid());
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |n: String, s: Vec<usize>| v.push((n, s));
        let lin = |add: &mut dyn FnMut(String, Vec<usize>), n: &str, out: usize, inp: usize| {
            add(format!("{n}.weight"), vec![out, inp]);
            add(format!("{n}.bias"), vec![out]);
        };
        let norm = |add: &mut dyn FnMut(String, Vec<usize>), n: &str| {
            add(format!("{n}.weight"), vec![w]);
            add(format!("{n}.bias"), vec![w]);
        };
        let block = |add: &mut dyn FnMut(String, Vec<usize>), b: &str, cross: bool| {
            norm(add, &format!("{b}.norm1"));
            let attns: &[&str] = if cross { &["attn", "cross"] } else { &["attn"] };
            for a in attns {
                for proj in ["q", "k", "v", "out"] {
                    lin(add, &format!("{b}.{a}.{proj}"), w, w);
                }
            }
            if cross {
                norm(add, &format!("{b}.norm_cross"));
            }
            norm(add, &format!("{b}.norm2"));
            lin(add, &format!("{b}.mlp.fc1"), w * self.mlp_ratio, w);
            lin(add, &format!("{b}.mlp.fc2"), w, w * self.mlp_ratio);
        };
        add(
            "vision.patch.proj.weight".into(),
            vec![w, self.channels, p, p],
        );
        add("vision.patch.proj.bias".into(), vec![w]);
        add("vision.pos_embed".into(), vec![1, g * g, w]);
        for i in 0..self.depth {
            block(&mut add, &format!("vision.blocks.{i}"), false);
        }
        norm(&mut add, "vision.norm");
        for (head, depth, max_len, out) in [
            (
                "caption_head",
                self.decoder_depth,
                self.max_caption_len,
                self.vocab_size,
            ),
            (
                "vqa_head",
                self.vqa_depth,
                self.max_question_len,
                self.answers.len(),
            ),
        ] {
            add(format!("{head}.embed.weight"), vec![self.vocab_size, w]);
            add(format!("{head}.pos.weight"), vec![max_len, w]);
            for i in 0..depth {
                block(&mut add, &format!("{head}.blocks.{i}"), true);
            }
            norm(&mut add, &format!("{head}.norm"));
            lin(&mut add, &format!("{head}.head"), out, w);
        }
        lin(
            &mut add,
            "ocr_head.head",
            self.ocr_steps * self.ocr_classes(),
            g * w,
        );
        lin(&mut add, "retrieval.image_proj", self.embed_dim, w);
        lin(
            &mut add,
            "retrieval.text_proj",
            self.embed_dim,
            self.text.hidden_size,
        );
        add("retrieval.logit_scale".into(), vec![]);
        v.extend(self.text.expected(TEXT));
        v
    }
}

/// Name prefix of the BERT text tower.
const TEXT: &str = "retrieval.text.";

/// The tasks of `MultiTaskVLM.forward`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Caption,
    Ocr,
    Vqa,
    Image,
    Text,
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "caption" => Task::Caption,
            "ocr" => Task::Ocr,
            "vqa" => Task::Vqa,
            "image" => Task::Image,
            "text" => Task::Text,
            _ => {
                return Err(Error::value(format!(
                    "task must be one of ('caption', 'ocr', 'vqa', 'image', 'text'), got {s:?}"
                )))
            }
        })
    }
}

/// Everything the model builds its layers with.
struct Loader<'a> {
    w: &'a Weights,
    mode: WeightMode,
    act_bits: Option<u32>,
    eps: f64,
}

impl Loader<'_> {
    fn linear(&self, n: &str) -> Result<Linear> {
        self.w.linear(
            &format!("{n}.weight"),
            Some(&format!("{n}.bias")),
            self.mode,
            self.act_bits,
        )
    }

    fn norm(&self, n: &str) -> Result<LayerNorm> {
        LayerNorm::new(
            &self.w.get(&format!("{n}.weight"))?,
            &self.w.get(&format!("{n}.bias"))?,
            self.eps,
        )
    }

    fn attention(&self, n: &str, heads: usize) -> Result<Attention> {
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

    fn block(&self, name: String, heads: usize, cross: bool) -> Result<Block> {
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

    fn decoder(&self, name: &'static str, depth: usize, heads: usize) -> Result<Decoder> {
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
struct Attention {
    mha: MultiHeadAttention,
    out: Linear,
}

impl Attention {
    /// Records the context vectors as the input of `{name}.out` (see `INPUT`).
    fn forward(
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
struct Block {
    name: String,
    norm1: LayerNorm,
    attn: Attention,
    cross: Option<(LayerNorm, Attention)>,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn forward(
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
struct Decoder {
    name: &'static str,
    embed: Embedding,
    pos: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
}

impl Decoder {
    /// Checks `ids` against the vocabulary and the position table, and `mask` against `ids`.
    fn check(&self, ids: ArrayView2<'_, i64>, mask: Option<ArrayView2<'_, i64>>) -> Result<()> {
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
    fn hidden(
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

/// The Rust twin of `lowbit.models.MultiTaskVLM`.
pub struct MultiTaskModel {
    pub config: MultiTaskConfig,
    /// The config as the file stores it.
    pub config_json: String,
    patch: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    caption_head: Decoder,
    vqa_head: Decoder,
    ocr_head: Linear,
    image_proj: Linear,
    text: BertEncoder,
    text_proj: Linear,
    pub logit_scale: f32,
}

impl MultiTaskModel {
    /// Loads a file `lowbit.models.save` wrote. Every `nn.Linear` follows `mode` and `act_bits`
    /// (as `lowbit.crossval.simulate` replaces them); the patch convolution, embeddings, norms
    /// and `pos_embed` stay float. Tensors the file stores quantized are used as stored.
    pub fn load(path: &Path, mode: WeightMode, act_bits: Option<u32>) -> Result<Self> {
        let w = Weights::load(path)?;
        let json = w.metadata().get(CONFIG_KEY).ok_or_else(|| {
            Error::format(format!(
                "{} has no {CONFIG_KEY:?} metadata: not a model file lowbit.models.save wrote",
                path.display()
            ))
        })?;
        let config = MultiTaskConfig::from_json(json)?;
        Self::from_weights(config, json.clone(), &w, mode, act_bits)
    }

    pub fn from_weights(
        config: MultiTaskConfig,
        config_json: String,
        w: &Weights,
        mode: WeightMode,
        act_bits: Option<u32>,
    ) -> Result<Self> {
        let c = &config;
        w.ensure_layers(
            [
                c.depth,
                c.decoder_depth,
                c.vqa_depth,
                c.text.num_hidden_layers,
            ]
            .into_iter()
            .fold(0, usize::saturating_add),
        )?;
        w.check(&config.expected(), |n| {
            n == "retrieval.text.embeddings.position_ids"
                || n == "retrieval.text.embeddings.token_type_ids"
        })?;
        let c = &config;
        let ld = Loader {
            w,
            mode,
            act_bits,
            eps: c.layer_norm_eps,
        };
        let (p, g) = (c.patch_size, c.grid());
        // The convolution is not an nn.Linear: float unless the file stores it quantized.
        let proj = w.linear(
            "vision.patch.proj.weight",
            Some("vision.patch.proj.bias"),
            WeightMode::F32,
            None,
        )?;
        let scale = w.get("retrieval.logit_scale")?;
        Ok(MultiTaskModel {
            patch: Conv2d::from_linear(proj, c.channels, (p, p), (p, p), (0, 0))?,
            pos_embed: w
                .get("vision.pos_embed")?
                .reshape((g * g, c.width))
                .map_err(ce)?,
            blocks: (0..c.depth)
                .map(|i| ld.block(format!("vision.blocks.{i}"), c.heads, false))
                .collect::<Result<_>>()?,
            norm: ld.norm("vision.norm")?,
            caption_head: ld.decoder("caption_head", c.decoder_depth, c.heads)?,
            vqa_head: ld.decoder("vqa_head", c.vqa_depth, c.heads)?,
            ocr_head: ld.linear("ocr_head.head")?,
            image_proj: ld.linear("retrieval.image_proj")?,
            text: BertEncoder::from_weights(c.text.clone(), w, TEXT, mode, act_bits)?,
            text_proj: ld.linear("retrieval.text_proj")?,
            logit_scale: to_vec(&scale)?[0],
            config_json,
            config,
        })
    }

    /// The vision encoder's tokens (batch, grid², width) for images (batch, channels, size, size).
    pub fn image_tokens(
        &self,
        images: ArrayView4<'_, f32>,
        record: Option<&mut Record>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, h, w) = images.dim();
        ensure!(
            (ch, h, w) == (c.channels, c.image_size, c.image_size),
            "images must be (batch, {}, {}, {}), got ({b}, {ch}, {h}, {w})",
            c.channels,
            c.image_size,
            c.image_size
        );
        ensure!(b > 0, "the batch of images is empty");
        let mut rec = Recorder(record);
        let x = tensor(images.iter().copied().collect(), (b, ch, h, w))?;
        let t = self.patch.forward_tokens(&x)?;
        rec.add(|| "vision.patch".into(), &t);
        let mut x = add(&t, &self.pos_embed)?;
        for blk in &self.blocks {
            x = blk.forward(&x, None, None, false, &mut rec)?;
        }
        let x = self.norm.forward(&x)?;
        rec.add(|| "vision.norm".into(), &x);
        rec.add(|| "vision".into(), &x);
        Ok(x)
    }

    /// Next-token logits (batch, len, vocab) of the decoder input `ids` (teacher forcing).
    pub fn caption_logits(
        &self,
        tokens: &Tensor,
        ids: ArrayView2<'_, i64>,
        record: Option<&mut Record>,
    ) -> Result<Tensor> {
        let mut rec = Recorder(record);
        let h = self
            .caption_head
            .hidden(tokens, ids, None, true, &mut rec)?;
        let y = self.caption_head.head.forward(&h)?;
        rec.add(|| "caption_head.head".into(), &y);
        rec.add(|| "caption_head".into(), &y);
        Ok(y)
    }

    /// CTC logits (batch, grid * ocr_steps, classes); class 0 is the blank.
    pub fn ocr_logits(&self, tokens: &Tensor, record: Option<&mut Record>) -> Result<Tensor> {
        let mut rec = Recorder(record);
        let (g, steps, classes) = (
            self.config.grid(),
            self.config.ocr_steps,
            self.config.ocr_classes(),
        );
        let (b, n, d) = tokens.dims3().map_err(ce)?;
        ensure!(n == g * g, "expected {} image tokens, got {n}", g * g);
        // Column j of the grid: tokens (0, j), (1, j), ... concatenated top to bottom.
        let cols = tokens
            .reshape((b, g, g, d))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((b, g, g * d)))
            .map_err(ce)?;
        let y = self.ocr_head.forward(&cols)?;
        rec.add(|| "ocr_head.head".into(), &y);
        let y = y.reshape((b, g * steps, classes)).map_err(ce)?;
        rec.add(|| "ocr_head".into(), &y);
        Ok(y)
    }

    /// `mask`, or `ids != pad_id` when there is none.
    fn mask_or_default<'a>(
        &self,
        ids: ArrayView2<'_, i64>,
        mask: Option<ArrayView2<'a, i64>>,
    ) -> CowArray<'a, i64, Ix2> {
        match mask {
            Some(m) => m.into(),
            None => ids.mapv(|i| (i != self.config.pad_id) as i64).into(),
        }
    }

    /// Answer logits (batch, answers) from the question encoder's first (`[CLS]`) token.
    /// `mask` defaults to `ids != pad_id`.
    pub fn vqa_logits(
        &self,
        tokens: &Tensor,
        ids: ArrayView2<'_, i64>,
        mask: Option<ArrayView2<'_, i64>>,
        record: Option<&mut Record>,
    ) -> Result<Tensor> {
        let mut rec = Recorder(record);
        let mask = self.mask_or_default(ids, mask);
        // Only the first token is read: the columns no question attends to are skipped (see
        // `used_len`) unless every layer is recorded at its torch module's shape.
        self.vqa_head.check(ids, Some(mask.view()))?;
        let l = if rec.is_on() {
            ids.ncols()
        } else {
            used_len(mask.view())
        };
        let h = self.vqa_head.hidden(
            tokens,
            ids.slice(s![.., ..l]),
            Some(mask.slice(s![.., ..l])),
            false,
            &mut rec,
        )?;
        let first = h.narrow(1, 0, 1).and_then(|t| t.squeeze(1)).map_err(ce)?;
        let y = self.vqa_head.head.forward(&first)?;
        rec.add(|| "vqa_head.head".into(), &y);
        rec.add(|| "vqa_head".into(), &y);
        Ok(y)
    }

    /// L2-normalised image embeddings (batch, embed_dim): the mean token, projected.
    pub fn embed_images(&self, tokens: &Tensor, record: Option<&mut Record>) -> Result<Tensor> {
        let mut rec = Recorder(record);
        let y = self.image_proj.forward(&mean_pool(tokens, None)?)?;
        rec.add(|| "retrieval.image_proj".into(), &y);
        l2_normalize(&y)
    }

    /// L2-normalised text embeddings (batch, embed_dim): the BERT tower mean-pooled over the
    /// unmasked tokens, projected. `mask` defaults to `ids != pad_id`.
    pub fn embed_texts(
        &self,
        ids: ArrayView2<'_, i64>,
        mask: Option<ArrayView2<'_, i64>>,
        record: Option<&mut Record>,
    ) -> Result<Tensor> {
        let mask = self.mask_or_default(ids, mask);
        let mut rec = Recorder(record);
        let pooled = if rec.is_on() {
            // Every column, so that each recorded layer has its torch module's shape.
            let mut inner = Record::new();
            let h = self
                .text
                .forward(ids, mask.view(), None, Some(&mut inner))?;
            for (name, t) in inner {
                rec.add(|| format!("{TEXT}{name}"), &t);
            }
            rec.add(|| TEXT.trim_end_matches('.').into(), &h);
            mean_pool(&h, Some(&mask.iter().copied().collect::<Vec<_>>()))?
        } else {
            self.text.mean_hidden(ids, mask.view(), None)?
        };
        let y = self.text_proj.forward(&pooled)?;
        rec.add(|| "retrieval.text_proj".into(), &y);
        l2_normalize(&y)
    }

    /// `MultiTaskVLM.forward`: runs the vision encoder (except for `Text`) and the task's head.
    pub fn forward(
        &self,
        task: Task,
        images: Option<ArrayView4<'_, f32>>,
        ids: Option<ArrayView2<'_, i64>>,
        mask: Option<ArrayView2<'_, i64>>,
        mut record: Option<&mut Record>,
    ) -> Result<Tensor> {
        let need_ids = || ids.ok_or_else(|| Error::value("this task needs ids"));
        if task == Task::Text {
            return self.embed_texts(need_ids()?, mask, record);
        }
        if matches!(task, Task::Caption | Task::Vqa) {
            need_ids()?;
        }
        let images = images.ok_or_else(|| Error::value("this task needs images"))?;
        let tokens = self.image_tokens(images, record.as_deref_mut())?;
        match task {
            Task::Caption => self.caption_logits(&tokens, need_ids()?, record),
            Task::Ocr => self.ocr_logits(&tokens, record),
            Task::Vqa => self.vqa_logits(&tokens, need_ids()?, mask, record),
            Task::Image => self.embed_images(&tokens, record),
            Task::Text => unreachable!("handled above"),
        }
    }

    /// Log-probabilities (rows, vocab) of the token after each prefix (rows, len), row `r`
    /// attending to the tokens of image `images[r]` of `tokens` (batch, n, width).
    fn next_logprobs(
        &self,
        tokens: &Tensor,
        images: &[u32],
        prefix: &Array2<i64>,
    ) -> Result<Vec<Vec<f64>>> {
        let l = prefix.ncols();
        let idx = Tensor::new(images, tokens.device()).map_err(ce)?;
        let ctx = tokens.index_select(&idx, 0).map_err(ce)?;
        let h = self
            .caption_head
            .hidden(&ctx, prefix.view(), None, true, &mut Recorder(None))?;
        let last = h
            .narrow(1, l - 1, 1)
            .and_then(|t| t.squeeze(1))
            .map_err(ce)?;
        let logits = to_vec(&self.caption_head.head.forward(&last)?)?;
        let v = self.config.vocab_size;
        Ok(logits
            .chunks_exact(v)
            .map(|row| {
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                // torch's log_softmax is float32; its values then sum in float64.
                row.iter()
                    .map(|&x| (x as f64 - lse) as f32 as f64)
                    .collect()
            })
            .collect())
    }

    /// Caption token ids (without `[BOS]`; ending with `[EOS]` unless `max_len` ran out) by
    /// greedy (`beam = 1`) or beam search, with the rules of `lowbit.models._decode`: each
    /// step extends every live prefix by its `beam` best tokens (one decoder call for the live
    /// prefixes of all images); per image, the candidates (finished prefixes first, then the
    /// extensions in order) are stably sorted by summed log-probability and the best `beam`
    /// kept; the answer is the first best by mean log-probability per generated token.
    pub fn caption(&self, tokens: &Tensor, max_len: usize, beam: usize) -> Result<Vec<Vec<i64>>> {
        type Hyp = (Vec<i64>, f64, bool);
        let c = &self.config;
        ensure!(beam >= 1, "beam must be a positive int, got {beam}");
        ensure!(
            (1..=c.max_caption_len).contains(&max_len),
            "max_len must be between 1 and {}, got {max_len}",
            c.max_caption_len
        );
        let (b, _, _) = tokens.dims3().map_err(ce)?;
        // (sequence, summed log-prob, finished) per image
        let mut hyps: Vec<Vec<Hyp>> = vec![vec![(vec![c.bos_id], 0.0, false)]; b];
        for _ in 0..max_len {
            let live: Vec<(usize, &Hyp)> = hyps
                .iter()
                .enumerate()
                .flat_map(|(i, hs)| hs.iter().filter(|h| !h.2).map(move |h| (i, h)))
                .collect();
            if live.is_empty() {
                break;
            }
            let len = live[0].1 .0.len();
            let flat: Vec<i64> = live.iter().flat_map(|(_, h)| h.0.iter().copied()).collect();
            let prefix = Array2::from_shape_vec((live.len(), len), flat).expect("equal lengths");
            let images: Vec<u32> = live.iter().map(|(i, _)| *i as u32).collect();
            let logp = self.next_logprobs(tokens, &images, &prefix)?;
            let mut cands: Vec<Vec<Hyp>> = hyps
                .iter()
                .map(|hs| hs.iter().filter(|h| h.2).cloned().collect())
                .collect();
            for ((img, h), lp) in live.iter().zip(&logp) {
                for t in top_k(lp, beam) {
                    let mut seq = h.0.clone();
                    seq.push(t as i64);
                    cands[*img].push((seq, h.1 + lp[t], t as i64 == c.eos_id));
                }
            }
            for cs in &mut cands {
                cs.sort_by(|a, b| b.1.total_cmp(&a.1));
                cs.truncate(beam);
            }
            hyps = cands;
        }
        let mean = |h: &Hyp| h.1 / (h.0.len() - 1) as f64;
        Ok(hyps
            .iter()
            .map(|hs| {
                let mut best = &hs[0];
                for h in &hs[1..] {
                    if mean(h) > mean(best) {
                        best = h;
                    }
                }
                best.0[1..].to_vec()
            })
            .collect())
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(k);
    idx
}

/// Index of the largest value of each row (the first on ties; NaN counts as largest, as in
/// torch's argmax).
pub fn argmax_rows(x: &[f32], width: usize) -> Vec<usize> {
    x.chunks_exact(width.max(1))
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                let b = row[best];
                if !b.is_nan() && (v > b || v.is_nan()) {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// Greedy CTC decoding of logits (batch, frames, classes): the best class per frame, repeats
/// merged, blanks (0) dropped. Returns the class indices (character `i - 1` of the charset).
pub fn ctc_greedy(logits: &Tensor) -> Result<Vec<Vec<usize>>> {
    let (b, f, k) = logits.dims3().map_err(ce)?;
    let best = argmax_rows(&to_vec(logits)?, k);
    Ok((0..b)
        .map(|i| {
            let mut out = Vec::new();
            let mut prev = 0;
            for &c in &best[i * f..(i + 1) * f] {
                if c != prev && c != 0 {
                    out.push(c);
                }
                prev = c;
            }
            out
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array4};
    use std::collections::BTreeMap;

    fn config_json(extra: &str) -> String {
        format!(
            r#"{{"image_size": 16, "patch_size": 4, "channels": 2, "width": 8, "depth": 1,
            "heads": 2, "mlp_ratio": 2, "decoder_depth": 1, "vqa_depth": 1, "vocab_size": 11,
            "max_caption_len": 6, "max_question_len": 5, "max_text_len": 7, "charset": "AB",
            "ocr_steps": 2, "answers": ["yes", "no", "maybe"], "embed_dim": 4,
            "layer_norm_eps": 1e-6, "pad_id": 0, "bos_id": 2, "eos_id": 3, "cls_id": 4{extra},
            "text": {{"vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 7,
            "type_vocab_size": 1, "hidden_dropout_prob": 0.0}}}}"#
        )
    }

    /// A model with deterministic pseudo-random weights (norms at 1 and 0).
    fn model() -> MultiTaskModel {
        let json = config_json("");
        let c = MultiTaskConfig::from_json(&json).unwrap();
        let mut map = BTreeMap::new();
        for (i, (name, shape)) in c.expected().into_iter().enumerate() {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.contains("norm") || name.contains("LayerNorm") {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else {
                (0..n)
                    .map(|j| (((j * 7919 + i * 104_729) % 1013) as f32 / 1013.0 - 0.5) * 0.8)
                    .collect()
            };
            map.insert(name, tensor(v, shape).unwrap());
        }
        let w = Weights::from_map(map);
        MultiTaskModel::from_weights(c, json, &w, WeightMode::F32, None).unwrap()
    }

    fn images(b: usize) -> Array4<f32> {
        Array4::from_shape_fn((b, 2, 16, 16), |(i, c, y, x)| {
            ((i * 31 + c * 17 + y * 5 + x * 3) % 23) as f32 / 23.0
        })
    }

    fn names(r: &Record) -> Vec<&str> {
        r.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn config_is_validated() {
        let c = MultiTaskConfig::from_json(&config_json("")).unwrap();
        assert_eq!((c.grid(), c.ocr_classes(), c.text.hidden_size), (4, 3, 8));
        let err = |extra: &str| {
            MultiTaskConfig::from_json(&config_json(extra))
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#", "colour": 1"#).contains("unknown field `colour`"));
        assert!(err(r#", "width": 7"#).contains("duplicate field"));
        let bad = config_json("").replace(r#""heads": 2"#, r#""heads": 3"#);
        assert!(MultiTaskConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("not a multiple of heads"));
        let bad = config_json("").replace(r#""depth": 1,"#, r#""depth": 0,"#);
        assert!(MultiTaskConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("depth must be a positive int"));
        let bad = config_json("").replace(r#""eos_id": 3"#, r#""eos_id": 11"#);
        assert!(MultiTaskConfig::from_json(&bad).is_err());
        assert!(MultiTaskConfig::from_json("[]").is_err());
    }

    #[test]
    fn tasks_run_only_their_head() {
        let m = model();
        let img = images(2);
        let ids = Array2::from_shape_vec((2, 3), vec![2, 5, 6, 2, 7, 0]).unwrap();
        let mask = ids.mapv(|i| (i != 0) as i64);
        for (task, dims, head) in [
            (Task::Caption, vec![2, 3, 11], "caption_head"),
            (Task::Ocr, vec![2, 8, 3], "ocr_head"),
            (Task::Vqa, vec![2, 3], "vqa_head"),
            (Task::Image, vec![2, 4], "retrieval.image_proj"),
            (Task::Text, vec![2, 4], "retrieval.text_proj"),
        ] {
            let mut rec = Record::new();
            let y = m
                .forward(
                    task,
                    Some(img.view()),
                    Some(ids.view()),
                    Some(mask.view()),
                    Some(&mut rec),
                )
                .unwrap();
            assert_eq!(y.dims(), dims.as_slice(), "{task:?}");
            let n = names(&rec);
            assert!(n.contains(&head), "{task:?}: {n:?}");
            let heads = ["caption_head", "ocr_head", "vqa_head", "retrieval"];
            let others = n
                .iter()
                .filter(|x| heads.iter().any(|h| x.starts_with(h)) && !x.starts_with(head));
            let text_tower = |x: &&&str| task == Task::Text && x.starts_with("retrieval.text");
            assert_eq!(others.filter(|x| !text_tower(x)).count(), 0, "{n:?}");
            assert_eq!(
                n.iter().any(|x| x.starts_with("vision")),
                task != Task::Text
            );
            if matches!(task, Task::Image | Task::Text) {
                let v = to_vec(&y).unwrap();
                for row in v.chunks(4) {
                    let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                    assert!((norm - 1.0).abs() < 1e-5);
                }
            }
        }
        let mut rec = Record::new();
        m.forward(Task::Ocr, Some(img.view()), None, None, Some(&mut rec))
            .unwrap();
        let n = names(&rec);
        for want in [
            "vision.patch",
            "vision.blocks.0.norm1",
            "vision.blocks.0.attn",
            "vision.blocks.0.mlp",
            "vision.blocks.0",
            "vision.norm",
            "ocr_head.head",
            "ocr_head",
        ] {
            assert!(n.contains(&want), "{want} not in {n:?}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = model();
        let img = images(2);
        let tokens = m.image_tokens(img.view(), None).unwrap();
        let ids = |v: Vec<i64>, l: usize| Array2::from_shape_vec((v.len() / l, l), v).unwrap();
        let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
        let wrong = Array4::<f32>::zeros((2, 3, 16, 16));
        assert!(msg(m.image_tokens(wrong.view(), None)).contains("images must be"));
        let empty = Array4::<f32>::zeros((0, 2, 16, 16));
        assert!(msg(m.image_tokens(empty.view(), None)).contains("empty"));
        let a = ids(vec![2, 11, 2, 1], 2);
        assert!(msg(m.caption_logits(&tokens, a.view(), None)).contains("outside the vocabulary"));
        let a = ids(vec![2; 14], 7);
        assert!(msg(m.caption_logits(&tokens, a.view(), None)).contains("exceed the maximum of 6"));
        let a = ids(vec![2; 3], 1);
        assert!(msg(m.caption_logits(&tokens, a.view(), None)).contains("batch"));
        let a = ids(vec![4, 5, 4, 0], 2);
        let bad = ids(vec![1, 2, 1, 0], 2);
        assert!(msg(m.vqa_logits(&tokens, a.view(), Some(bad.view()), None)).contains("0 and 1"));
        assert!(msg(m.embed_texts(a.view(), Some(bad.view()), None)).contains("0 and 1"));
        let none = m.forward(Task::Vqa, Some(img.view()), None, None, None);
        assert!(msg(none).contains("needs ids"));
        let none = m.forward(Task::Ocr, None, None, None, None);
        assert!(msg(none).contains("needs images"));
        assert!("segment".parse::<Task>().is_err());
        assert!(m.caption(&tokens, 0, 1).is_err());
        assert!(m.caption(&tokens, 7, 1).is_err());
        assert!(m.caption(&tokens, 3, 0).is_err());
    }

    #[test]
    fn greedy_decoding_follows_the_argmax() {
        let m = model();
        let tokens = m.image_tokens(images(2).view(), None).unwrap();
        let c = &m.config;
        let greedy = m.caption(&tokens, c.max_caption_len, 1).unwrap();
        for (img, got) in greedy.iter().enumerate() {
            let mut seq = vec![c.bos_id];
            let t = tokens.narrow(0, img, 1).unwrap();
            while seq.len() <= c.max_caption_len && seq.last() != Some(&c.eos_id) {
                let ids = Array2::from_shape_vec((1, seq.len()), seq.clone()).unwrap();
                let y = to_vec(&m.caption_logits(&t, ids.view(), None).unwrap()).unwrap();
                let v = c.vocab_size;
                seq.push(argmax_rows(&y[y.len() - v..], v)[0] as i64);
            }
            assert_eq!(got, &seq[1..]);
        }
        for beam in [2, 3, 50] {
            for max_len in [1, 3, 6] {
                let out = m.caption(&tokens, max_len, beam).unwrap();
                assert!(out.iter().all(|s| !s.is_empty() && s.len() <= max_len));
                assert!(out
                    .iter()
                    .all(|s| s[..s.len() - 1].iter().all(|&t| t != c.eos_id)));
            }
        }
    }

    #[test]
    fn ctc_and_argmax() {
        // frames: 1 1 0 1 2 2 0 -> [1, 1, 2]
        let best = [1usize, 1, 0, 1, 2, 2, 0];
        let mut v = vec![0f32; best.len() * 3];
        for (f, &c) in best.iter().enumerate() {
            v[f * 3 + c] = 1.0;
        }
        let logits = tensor(v, (1, 7, 3)).unwrap();
        assert_eq!(ctc_greedy(&logits).unwrap(), vec![vec![1, 1, 2]]);
        assert_eq!(argmax_rows(&[1.0, 3.0, 3.0, f32::NAN, 2.0], 5), vec![3]);
        assert_eq!(argmax_rows(&[0.5, 0.5, 0.1], 3), vec![0]);
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
    }
}
