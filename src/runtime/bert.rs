//! A BERT text encoder (post-LayerNorm, absolute positions, token types) that loads Hugging Face
//! `BertModel` checkpoints and matches `transformers` to float32 rounding.
use super::layers::{
    l2_normalize, mask_bias, mean_pool, to_vec, used_len, Activation, Embedding, LayerNorm, Linear,
    MultiHeadAttention, WeightMode,
};
use super::ops::add;
use super::weights::Weights;
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

/// The folder and the weights file of a checkpoint given as either.
fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        let st = path.join("model.safetensors");
        ensure!(
            st.is_file(),
            "{} has no model.safetensors (save with safe_serialization=True)",
            path.display()
        );
        Ok((path.to_path_buf(), st))
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

impl BertConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let c: BertConfig = serde_json::from_str(text)
            .map_err(|e| Error::value(format!("bad BERT config.json: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks what the encoder supports and that the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        ensure!(
            c.position_embedding_type == "absolute",
            "only absolute position embeddings are supported, got {:?}",
            c.position_embedding_type
        );
        ensure!(
            c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0,
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size,
            c.num_attention_heads
        );
        ensure!(
            c.vocab_size > 0 && c.type_vocab_size > 0 && c.max_position_embeddings > 0,
            "vocab_size, type_vocab_size and max_position_embeddings must be positive"
        );
        Activation::parse(&c.hidden_act)?;
        Ok(())
    }

    /// Every tensor a `BertModel` checkpoint holds (without the pooler), with its shape.
    pub fn expected(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut v = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            for (name, out, inp) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                v.push((format!("{p}{name}.weight"), vec![out, inp]));
                v.push((format!("{p}{name}.bias"), vec![out]));
            }
            for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
                v.push((format!("{p}{ln}.weight"), vec![h]));
                v.push((format!("{p}{ln}.bias"), vec![h]));
            }
        }
        v.into_iter()
            .map(|(n, s)| (format!("{prefix}{n}"), s))
            .collect()
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
        let config = BertConfig::from_json(&text)?;
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
        let pooler = [
            format!("{prefix}pooler.dense.weight"),
            format!("{prefix}pooler.dense.bias"),
        ];
        let has_pooler = w.get_opt(&pooler[0]).is_some();
        w.ensure_layers(config.num_hidden_layers)?;
        let mut expected = config.expected(prefix);
        if has_pooler {
            let h = config.hidden_size;
            expected.push((pooler[0].clone(), vec![h, h]));
            expected.push((pooler[1].clone(), vec![h]));
        }
        w.check(&expected, |n| {
            !n.starts_with(prefix) || n.ends_with("position_ids")
        })?;
        let get = |n: &str| w.get(&format!("{prefix}{n}"));
        let ln = |n: &str| -> Result<LayerNorm> {
            LayerNorm::new(
                &get(&format!("{n}.weight"))?,
                &get(&format!("{n}.bias"))?,
                config.layer_norm_eps,
            )
        };
        let lin = |n: &str| -> Result<Linear> {
            w.linear(
                &format!("{prefix}{n}.weight"),
                Some(&format!("{prefix}{n}.bias")),
                mode,
                act_bits,
            )
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}.");
                Ok(Layer {
                    attn: MultiHeadAttention::new(
                        lin(&format!("{p}attention.self.query"))?,
                        lin(&format!("{p}attention.self.key"))?,
                        lin(&format!("{p}attention.self.value"))?,
                        config.num_attention_heads,
                    )?,
                    attn_out: lin(&format!("{p}attention.output.dense"))?,
                    attn_ln: ln(&format!("{p}attention.output.LayerNorm"))?,
                    inter: lin(&format!("{p}intermediate.dense"))?,
                    out: lin(&format!("{p}output.dense"))?,
                    out_ln: ln(&format!("{p}output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BertEncoder {
            act: Activation::parse(&config.hidden_act)?,
            word: Embedding::new(get("embeddings.word_embeddings.weight")?)?,
            pos: Embedding::new(get("embeddings.position_embeddings.weight")?)?,
            tok: Embedding::new(get("embeddings.token_type_embeddings.weight")?)?,
            emb_ln: ln("embeddings.LayerNorm")?,
            pooler: if has_pooler {
                // The pooler stays float: it is one small layer on one token.
                Some(w.linear(&pooler[0], Some(&pooler[1]), WeightMode::F32, None)?)
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
        let (b, l) = ids.dim();
        ensure!(b > 0 && l > 0, "input_ids is empty: shape ({b}, {l})");
        ensure!(
            l <= self.config.max_position_embeddings,
            "sequences of {l} tokens exceed max_position_embeddings = {}",
            self.config.max_position_embeddings
        );
        ensure!(
            mask.dim() == (b, l),
            "attention_mask has shape {:?}, input_ids ({b}, {l})",
            mask.dim()
        );
        let v = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= v) {
            return Err(Error::value(format!(
                "input_ids contains {bad}, outside the vocabulary 0..{v}"
            )));
        }
        ensure!(
            mask.iter().all(|&m| m == 0 || m == 1),
            "attention_mask must contain only 0 and 1"
        );
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
