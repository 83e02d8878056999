//! The multi-task vision-language model of `lowbit.models.MultiTaskVLM`: a pre-LN ViT encoder
//! shared by four heads (caption decoder, OCR over the patch-grid columns, VQA question encoder,
//! retrieval projections with a BERT text tower), loaded from the file `lowbit.models.save`
//! writes. Each task runs only its own head; layers are recorded under the names of the torch
//! model's `named_modules()`.
mod blocks;
mod config;
mod decode;
mod heads;

pub use blocks::INPUT;
pub use config::{MultiTaskConfig, Task, CONFIG_KEY};
pub use decode::{argmax_rows, ctc_greedy};

use super::bert::BertEncoder;
use super::layers::{to_vec, Conv2d, LayerNorm, Linear, WeightMode};
use super::ops::{add, tensor};
use super::weights::Weights;
use super::{ce, Record, Recorder};
use crate::{ensure, Error, Result};
use blocks::{Block, Decoder, Loader};
use candle_core::Tensor;
use config::TEXT;
use ndarray::{ArrayView2, ArrayView4};
use std::path::Path;

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
            mode,
            act_bits,
            eps: c.layer_norm_eps,
        };
        let (vision, retrieval) = (w.pp("vision"), w.pp("retrieval"));
        let (p, g) = (c.patch_size, c.grid());
        // The convolution is not an nn.Linear: float unless the file stores it quantized.
        let proj = vision
            .pp("patch")
            .pp("proj")
            .linear(WeightMode::F32, None)?;
        let scale = retrieval.get("logit_scale")?;
        Ok(MultiTaskModel {
            patch: Conv2d::from_linear(proj, c.channels, (p, p), (p, p), (0, 0))?,
            pos_embed: vision
                .get("pos_embed")?
                .reshape((g * g, c.width))
                .map_err(ce)?,
            blocks: (0..c.depth)
                .map(|i| ld.block(&vision.pp("blocks").pp(i), c.heads, false))
                .collect::<Result<_>>()?,
            norm: ld.norm(&vision.pp("norm"))?,
            caption_head: ld.decoder(w, "caption_head", c.decoder_depth, c.heads)?,
            vqa_head: ld.decoder(w, "vqa_head", c.vqa_depth, c.heads)?,
            ocr_head: ld.linear(&w.pp("ocr_head").pp("head"))?,
            image_proj: ld.linear(&retrieval.pp("image_proj"))?,
            text: BertEncoder::from_weights(c.text.clone(), w, TEXT, mode, act_bits)?,
            text_proj: ld.linear(&retrieval.pp("text_proj"))?,
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
}

/// A small model with deterministic weights, shared by the tests of every part.
#[cfg(test)]
mod fixtures {
    use super::*;
    use ndarray::Array4;
    use std::collections::BTreeMap;

    pub(super) fn config_json(extra: &str) -> String {
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
    pub(super) fn model() -> MultiTaskModel {
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

    pub(super) fn images(b: usize) -> Array4<f32> {
        Array4::from_shape_fn((b, 2, 16, 16), |(i, c, y, x)| {
            ((i * 31 + c * 17 + y * 5 + x * 3) % 23) as f32 / 23.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{images, model};
    use super::*;
    use ndarray::{Array2, Array4};

    fn names(r: &Record) -> Vec<&str> {
        r.iter().map(|(n, _)| n.as_str()).collect()
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
}
