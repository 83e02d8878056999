//! The task heads: caption logits (teacher forcing), OCR, VQA and the retrieval embeddings.
use super::super::layers::{l2_normalize, mean_pool, used_len};
use super::super::{ce, Record, Recorder};
use super::{MultiTaskModel, TEXT};
use crate::{ensure, Result};
use candle_core::Tensor;
use ndarray::{s, ArrayView2, CowArray, Ix2};

impl MultiTaskModel {
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
}
