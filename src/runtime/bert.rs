//! A BERT text encoder (post-LayerNorm, absolute positions, token types) that loads Hugging Face
//! `BertModel` checkpoints and matches `transformers` to float32 rounding.
use super::inputs::{self, check_tokens};
use super::layers::{
    l2_normalize, mask_bias, mean_pool, to_vec, used_len, Activation, Embedding, LayerNorm, Linear,
    MultiHeadAttention, WeightMode,
};
use super::ops::add;
use super::weights::{Prefix, Scope, Weights};
use super::{ce, Record, Recorder};
use crate::{ensure, Error, Result};
use candle_core::Tensor;
use ndarray::{s, Array2, ArrayView2};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "gelu")]
    pub hidden_act: String,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn gelu() -> String {
    "gelu".into()
}
fn max_pos() -> usize {
    512
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn absolute() -> String {
    "absolute".into()
}

struct Layer {
    attn: MultiHeadAttention,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

pub struct BertEncoder {
    pub config: BertConfig,
    word: Embedding,
    pos: Embedding,
    tok: Embedding,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    act: Activation,
    pooler: Option<Linear>,
}

/// The folder and the weights file of a checkpoint given as either. A folder holds
/// `model.safetensors` (what `save_pretrained` writes), or else exactly one `.safetensors` file
/// (say, the `model.q4.safetensors` that `lowbit quantize` wrote beside `config.json`).
fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        let st = path.join("model.safetensors");
        if st.is_file() {
            return Ok((path.to_path_buf(), st));
        }
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| Error::io(format!("cannot list {}", path.display()), e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let weights: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        if let [one] = weights[..] {
            return Ok((path.to_path_buf(), path.join(one)));
        }
        let found = if names.is_empty() {
            "nothing".to_string()
        } else {
            names.join(", ")
        };
        let why = if weights.is_empty() {
            "no .safetensors file (a PyTorch .bin checkpoint is not read: save it with \
             save_pretrained(..., safe_serialization=True))"
                .to_string()
        } else {
            format!(
                "{} .safetensors files and no model.safetensors: give the path of the one to load",
                weights.len()
            )
        };
        Err(Error::value(format!(
            "{} holds {found}: a BERT checkpoint folder needs config.json and model.safetensors, or \
             config.json and a single .safetensors file (such as one lowbit quantize wrote); \
             it has {why}",
            path.display()
        )))
    } else if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok((dir, path.to_path_buf()))
    } else {
        Err(Error::io(
            format!("cannot open {}", path.display()),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    }
}

/// The largest size a config field may give: ids and offsets stay within 32-bit integers.
const MAX_SIZE: u64 = i32::MAX as u64;

/// The integer fields of a BERT config, in `BertConfig`'s order, with the least value each may
/// take (0 for `num_hidden_layers`: an encoder of the embeddings only).
const SIZE_FIELDS: [(&str, u64); 7] = [
    ("vocab_size", 1),
    ("hidden_size", 1),
    ("num_hidden_layers", 0),
    ("num_attention_heads", 1),
    ("intermediate_size", 1),
    ("max_position_embeddings", 1),
    ("type_vocab_size", 1),
];

fn check_size(field: &str, v: u64, least: u64) -> Result<()> {
    ensure!(
        (least..=MAX_SIZE).contains(&v),
        "BERT config: {field} must be an integer in {least}..={MAX_SIZE}, got {v}"
    );
    Ok(())
}

fn check_eps(eps: f64) -> Result<()> {
    // Used in float32: a value that rounds to 0 there is 0.
    ensure!(
        eps.is_finite() && eps > 0.0 && (eps as f32) > 0.0 && (eps as f32).is_finite(),
        "BERT config: layer_norm_eps must be a positive finite number (float32), got {eps}"
    );
    Ok(())
}

impl BertConfig {
    /// Parses and validates a `config.json`; a numeric field of the wrong type or out of range
    /// is named in the error.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::value(format!("bad BERT config.json: {e}")))?;
        if let Some(obj) = v.as_object() {
            for (field, least) in SIZE_FIELDS {
                match obj.get(field) {
                    None => {}
                    Some(x) => match x.as_u64() {
                        Some(n) => check_size(field, n, least)?,
                        None => {
                            return Err(Error::value(format!(
                                "BERT config: {field} must be an integer in {least}..={MAX_SIZE}, \
                                 got {x}"
                            )))
                        }
                    },
                }
            }
            if let Some(x) = obj.get("layer_norm_eps") {
                match x.as_f64() {
                    Some(e) => check_eps(e)?,
                    None => {
                        return Err(Error::value(format!(
                            "BERT config: layer_norm_eps must be a positive finite number, got {x}"
                        )))
                    }
                }
            }
        }
        let c: BertConfig = serde_json::from_value(v)
            .map_err(|e| Error::value(format!("bad BERT config.json: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks what the encoder supports, that every size is sane (positive, at most 2^31 - 1),
    /// `layer_norm_eps` positive and finite, and that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        ensure!(
            c.position_embedding_type == "absolute",
            "only absolute position embeddings are supported, got {:?}",
            c.position_embedding_type
        );
        let sizes = [
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size,
            c.max_position_embeddings,
            c.type_vocab_size,
        ];
        for ((field, least), v) in SIZE_FIELDS.into_iter().zip(sizes) {
            check_size(field, v as u64, least)?;
        }
        check_eps(c.layer_norm_eps)?;
        ensure!(
            c.hidden_size.is_multiple_of(c.num_attention_heads),
            "BERT config: hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size,
            c.num_attention_heads
        );
        Activation::parse(&c.hidden_act)?;
        Ok(())
    }

    /// Every tensor a `BertModel` checkpoint holds (without the pooler), with its shape.
    pub fn expected(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let p = Prefix::new(prefix);
        let emb = p.pp("embeddings");
        let mut v = vec![
            (
                emb.pp("word_embeddings").name("weight"),
                vec![self.vocab_size, h],
            ),
            (
                emb.pp("position_embeddings").name("weight"),
                vec![self.max_position_embeddings, h],
            ),
            (
                emb.pp("token_type_embeddings").name("weight"),
                vec![self.type_vocab_size, h],
            ),
            (emb.pp("LayerNorm").name("weight"), vec![h]),
            (emb.pp("LayerNorm").name("bias"), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let layer = p.pp("encoder.layer").pp(l);
            for (name, out, inp) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                v.push((layer.pp(name).name("weight"), vec![out, inp]));
                v.push((layer.pp(name).name("bias"), vec![out]));
            }
            for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
                v.push((layer.pp(ln).name("weight"), vec![h]));
                v.push((layer.pp(ln).name("bias"), vec![h]));
            }
        }
        v
    }
}

impl BertEncoder {
    /// Loads `config.json` and `model.safetensors` from a folder (or a .safetensors file with
    /// config.json beside it). Names may carry the `bert.` prefix of the task models; tensors
    /// outside it (task heads) are ignored.
    pub fn load(path: &Path, mode: WeightMode, act_bits: Option<u32>) -> Result<Self> {
        let (dir, file) = locate(path)?;
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::io(format!("cannot read {}", cfg_path.display()), e))?;
        let config = BertConfig::from_json(&text).map_err(|e| match e {
            Error::Value(m) => Error::Value(format!("{}: {m}", cfg_path.display())),
            e => e,
        })?;
        let w = Weights::load(&file)?;
        let prefix = if w.names().any(|n| n.starts_with("bert.")) {
            "bert."
        } else {
            ""
        };
        Self::from_weights(config, &w, prefix, mode, act_bits)
    }

    /// Builds the encoder from the tensors named `prefix` + the `BertModel` names (tensors
    /// outside the prefix are ignored); see `Weights::linear` for how each linear layer is built.
    pub fn from_weights(
        config: BertConfig,
        w: &Weights,
        prefix: &str,
        mode: WeightMode,
        act_bits: Option<u32>,
    ) -> Result<Self> {
        let s = w.scope(prefix);
        let pooler = s.pp("pooler.dense");
        let has_pooler = pooler.get_opt("weight").is_some();
        w.ensure_layers(config.num_hidden_layers)?;
        let mut expected = config.expected(prefix);
        if has_pooler {
            let h = config.hidden_size;
            expected.push((pooler.name("weight"), vec![h, h]));
            expected.push((pooler.name("bias"), vec![h]));
        }
        w.check(&expected, |n| {
            !n.starts_with(prefix) || n.ends_with("position_ids")
        })?;
        let ln = |m: Scope<'_>| m.layer_norm(config.layer_norm_eps);
        let lin = |m: Scope<'_>| m.linear(mode, act_bits);
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = s.pp("encoder.layer").pp(l);
                Ok(Layer {
                    attn: MultiHeadAttention::new(
                        lin(p.pp("attention.self.query"))?,
                        lin(p.pp("attention.self.key"))?,
                        lin(p.pp("attention.self.value"))?,
                        config.num_attention_heads,
                    )?,
                    attn_out: lin(p.pp("attention.output.dense"))?,
                    attn_ln: ln(p.pp("attention.output.LayerNorm"))?,
                    inter: lin(p.pp("intermediate.dense"))?,
                    out: lin(p.pp("output.dense"))?,
                    out_ln: ln(p.pp("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let emb = s.pp("embeddings");
        Ok(BertEncoder {
            act: Activation::parse(&config.hidden_act)?,
            word: emb.pp("word_embeddings").embedding()?,
            pos: emb.pp("position_embeddings").embedding()?,
            tok: emb.pp("token_type_embeddings").embedding()?,
            emb_ln: ln(emb.pp("LayerNorm"))?,
            pooler: if has_pooler {
                // The pooler stays float: it is one small layer on one token.
                Some(pooler.linear(WeightMode::F32, None)?)
            } else {
                None
            },
            layers,
            config,
        })
    }

    fn check_inputs(
        &self,
        ids: &ArrayView2<'_, i64>,
        mask: &ArrayView2<'_, i64>,
        types: Option<&ArrayView2<'_, i64>>,
    ) -> Result<()> {
        let c = &self.config;
        check_tokens(
            *ids,
            Some(*mask),
            c.vocab_size,
            c.max_position_embeddings,
            &inputs::BERT,
        )?;
        let (b, l) = ids.dim();
        if let Some(t) = types {
            ensure!(
                t.dim() == (b, l),
                "token_type_ids has shape {:?}, input_ids ({b}, {l})",
                t.dim()
            );
            let tv = self.config.type_vocab_size as i64;
            ensure!(
                t.iter().all(|&x| (0..tv).contains(&x)),
                "token_type_ids must lie in 0..{tv}"
            );
        }
        Ok(())
    }

    /// The last hidden state (batch, len, hidden); with `record`, every layer's output by the
    /// name of the matching `transformers` module.
    pub fn forward(
        &self,
        ids: ArrayView2<'_, i64>,
        mask: ArrayView2<'_, i64>,
        types: Option<ArrayView2<'_, i64>>,
        record: Option<&mut Record>,
    ) -> Result<Tensor> {
        self.check_inputs(&ids, &mask, types.as_ref())?;
        let (b, l) = ids.dim();
        let ids_v: Vec<i64> = ids.iter().copied().collect();
        let types_v: Vec<i64> = match &types {
            Some(t) => t.iter().copied().collect(),
            None => vec![0; b * l],
        };
        let words = self.word.forward(&ids_v, &[b, l])?;
        let toks = self.tok.forward(&types_v, &[b, l])?;
        let pos = self.pos.first(l)?;
        let x = add(&add(&words, &toks)?, &pos)?;
        let mut x = self.emb_ln.forward(&x)?;
        let mut rec = Recorder(record);
        rec.add(|| "embeddings".into(), &x);
        // Padding keys get the most negative float added to their scores, as transformers does.
        let mask_v: Vec<i64> = mask.iter().copied().collect();
        let bias = mask_bias(&mask_v);
        for (i, layer) in self.layers.iter().enumerate() {
            let ctx = layer.attn.forward(&x, None, Some(&bias), false)?;
            rec.add(|| format!("encoder.layer.{i}.attention.self"), &ctx);
            let a = layer.attn_out.forward(&ctx)?;
            let a = layer.attn_ln.forward_residual(&a, Some(&x))?;
            rec.add(|| format!("encoder.layer.{i}.attention"), &a);
            let f = layer.inter.forward_act(&a, Some(self.act))?;
            rec.add(|| format!("encoder.layer.{i}.intermediate"), &f);
            let o = layer.out.forward(&f)?;
            x = layer.out_ln.forward_residual(&o, Some(&a))?;
            rec.add(|| format!("encoder.layer.{i}"), &x);
        }
        if let Some(p) = &self.pooler {
            if rec.is_on() {
                let first = x.narrow(1, 0, 1).and_then(|t| t.squeeze(1)).map_err(ce)?;
                let pooled = p.forward(&first)?.tanh().map_err(ce)?;
                rec.add(|| "pooler".into(), &pooled);
            }
        }
        Ok(x)
    }

    /// Mean of the hidden states over unmasked tokens, L2-normalised (sentence-transformers).
    pub fn embed(
        &self,
        ids: ArrayView2<'_, i64>,
        mask: ArrayView2<'_, i64>,
        types: Option<ArrayView2<'_, i64>>,
    ) -> Result<Array2<f32>> {
        let e = l2_normalize(&self.mean_hidden(ids, mask, types)?)?;
        let h = self.config.hidden_size;
        Ok(Array2::from_shape_vec((ids.nrows(), h), to_vec(&e)?).expect("b x hidden"))
    }

    /// The last hidden state averaged over the unmasked tokens (batch, hidden), without
    /// computing the trailing columns no row attends to (see `used_len`).
    pub fn mean_hidden(
        &self,
        ids: ArrayView2<'_, i64>,
        mask: ArrayView2<'_, i64>,
        types: Option<ArrayView2<'_, i64>>,
    ) -> Result<Tensor> {
        self.check_inputs(&ids, &mask, types.as_ref())?;
        let l = s![.., ..used_len(mask)];
        let mask = mask.slice(l);
        let hs = self.forward(ids.slice(l), mask, types.map(|t| t.slice_move(l)), None)?;
        mean_pool(&hs, Some(&mask.iter().copied().collect::<Vec<_>>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16}"#;

    fn with(field: &str, value: &str) -> Result<BertConfig> {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        BertConfig::from_json(&v.to_string())
    }

    #[test]
    fn every_numeric_field_is_validated_by_name() {
        assert!(BertConfig::from_json(GOOD).is_ok());
        assert!(with("num_hidden_layers", "0").is_ok());
        for (field, value) in [
            ("layer_norm_eps", "-1"),
            ("layer_norm_eps", "0"),
            ("layer_norm_eps", "1e-50"),
            ("layer_norm_eps", "1e300"),
            ("layer_norm_eps", "\"small\""),
            ("hidden_size", "0"),
            ("hidden_size", "18446744073709551616"),
            ("hidden_size", "4294967296"),
            ("hidden_size", "-8"),
            ("hidden_size", "8.5"),
            ("vocab_size", "0"),
            ("num_attention_heads", "0"),
            ("num_attention_heads", "3"),
            ("intermediate_size", "0"),
            ("max_position_embeddings", "0"),
            ("type_vocab_size", "0"),
            ("num_hidden_layers", "18446744073709551615"),
        ] {
            let err = with(field, value).unwrap_err();
            assert!(matches!(err, Error::Value(_)), "{field} = {value}: {err}");
            let want = if value == "3" {
                "num_attention_heads"
            } else {
                field
            };
            assert!(err.to_string().contains(want), "{field} = {value}: {err}");
        }
    }
}
