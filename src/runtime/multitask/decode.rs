//! Decoding: caption beam search over the caption head, greedy CTC for OCR.
use super::super::layers::to_vec;
use super::super::{ce, Recorder};
use super::MultiTaskModel;
use crate::{ensure, Result};
use candle_core::Tensor;
use ndarray::Array2;

impl MultiTaskModel {
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
    use super::super::fixtures::{images, model};
    use super::*;
    use crate::runtime::ops::tensor;

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
