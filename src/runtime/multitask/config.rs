//! The model's sizes (`lowbit.models.MultiTaskConfig`), the names and shapes of its tensors,
//! and the tasks it runs.
use super::super::bert::BertConfig;
use super::super::weights::Prefix;
use crate::names::string_enum;
use crate::{ensure, Error, Result};
use serde::Deserialize;

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
            c.image_size.is_multiple_of(c.patch_size),
            "image_size {} is not a multiple of patch_size {}",
            c.image_size,
            c.patch_size
        );
        ensure!(
            c.width.is_multiple_of(c.heads),
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
        let lin = |v: &mut Vec<_>, m: &Prefix, out: usize, inp: usize| {
            v.push((m.name("weight"), vec![out, inp]));
            v.push((m.name("bias"), vec![out]));
        };
        let norm = |v: &mut Vec<_>, m: &Prefix| {
            v.push((m.name("weight"), vec![w]));
            v.push((m.name("bias"), vec![w]));
        };
        let block = |v: &mut Vec<_>, b: &Prefix, cross: bool| {
            norm(v, &b.pp("norm1"));
            let attns: &[&str] = if cross { &["attn", "cross"] } else { &["attn"] };
            for a in attns {
                for proj in ["q", "k", "v", "out"] {
                    lin(v, &b.pp(a).pp(proj), w, w);
                }
            }
            if cross {
                norm(v, &b.pp("norm_cross"));
            }
            norm(v, &b.pp("norm2"));
            lin(v, &b.pp("mlp").pp("fc1"), w * self.mlp_ratio, w);
            lin(v, &b.pp("mlp").pp("fc2"), w, w * self.mlp_ratio);
        };
        let root = Prefix::default();
        let vision = root.pp("vision");
        let patch = vision.pp("patch").pp("proj");
        v.push((patch.name("weight"), vec![w, self.channels, p, p]));
        v.push((patch.name("bias"), vec![w]));
        v.push((vision.name("pos_embed"), vec![1, g * g, w]));
        for i in 0..self.depth {
            block(&mut v, &vision.pp("blocks").pp(i), false);
        }
        norm(&mut v, &vision.pp("norm"));
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
            let head = root.pp(head);
            v.push((head.pp("embed").name("weight"), vec![self.vocab_size, w]));
            v.push((head.pp("pos").name("weight"), vec![max_len, w]));
            for i in 0..depth {
                block(&mut v, &head.pp("blocks").pp(i), true);
            }
            norm(&mut v, &head.pp("norm"));
            lin(&mut v, &head.pp("head"), out, w);
        }
        lin(
            &mut v,
            &root.pp("ocr_head").pp("head"),
            self.ocr_steps * self.ocr_classes(),
            g * w,
        );
        let retrieval = root.pp("retrieval");
        lin(&mut v, &retrieval.pp("image_proj"), self.embed_dim, w);
        lin(
            &mut v,
            &retrieval.pp("text_proj"),
            self.embed_dim,
            self.text.hidden_size,
        );
        v.push((retrieval.name("logit_scale"), vec![]));
        v.extend(self.text.expected(TEXT));
        v
    }
}

/// Name prefix of the BERT text tower.
pub(super) const TEXT: &str = "retrieval.text.";

/// The tasks of `MultiTaskVLM.forward`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Caption,
    Ocr,
    Vqa,
    Image,
    Text,
}

string_enum!(Task, "task", {
    "caption" => Caption,
    "ocr" => Ocr,
    "vqa" => Vqa,
    "image" => Image,
    "text" => Text,
});

#[cfg(test)]
mod tests {
    use super::super::fixtures::config_json;
    use super::*;

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
}
