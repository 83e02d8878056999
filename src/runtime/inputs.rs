//! The checks of token inputs that both models share: ids against the vocabulary and the
//! position table, the attention mask against the ids.
use crate::{ensure, Error, Result};
use ndarray::ArrayView2;

/// How a model's errors name its token inputs: the BERT encoder by the arguments of
/// `transformers`, the multi-task model as `lowbit.models` does.
pub(crate) struct Wording {
    ids: &'static str,
    mask: &'static str,
    /// "is" and "contains" as `ids` takes them.
    is: &'static str,
    contains: &'static str,
    /// The error of `len` tokens beyond `max`.
    too_long: fn(usize, usize) -> String,
}

pub(crate) const BERT: Wording = Wording {
    ids: "input_ids",
    mask: "attention_mask",
    is: "is",
    contains: "contains",
    too_long: |l, max| format!("sequences of {l} tokens exceed max_position_embeddings = {max}"),
};

pub(crate) const MULTITASK: Wording = Wording {
    ids: "ids",
    mask: "mask",
    is: "are",
    contains: "contain",
    too_long: |l, max| format!("{l} tokens exceed the maximum of {max}"),
};

/// Checks that `ids` (batch, len) is not empty and has at most `max_len` columns, that `mask`
/// has its shape, then that every id lies in `0..vocab` and the mask holds only 0 and 1.
pub(crate) fn check_tokens(
    ids: ArrayView2<'_, i64>,
    mask: Option<ArrayView2<'_, i64>>,
    vocab: usize,
    max_len: usize,
    say: &Wording,
) -> Result<()> {
    let (ids_name, mask_name) = (say.ids, say.mask);
    let (b, l) = ids.dim();
    ensure!(
        b > 0 && l > 0,
        "{ids_name} {} empty: shape ({b}, {l})",
        say.is
    );
    ensure!(l <= max_len, "{}", (say.too_long)(l, max_len));
    if let Some(m) = mask {
        ensure!(
            m.dim() == (b, l),
            "{mask_name} has shape {:?}, {ids_name} ({b}, {l})",
            m.dim()
        );
    }
    let v = vocab as i64;
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i >= v) {
        return Err(Error::value(format!(
            "{ids_name} {} {bad}, outside the vocabulary 0..{v}",
            say.contains
        )));
    }
    if let Some(m) = mask {
        ensure!(
            m.iter().all(|&x| x == 0 || x == 1),
            "{mask_name} must contain only 0 and 1"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn errors_name_the_inputs_as_each_model_does() {
        let ids = |v: Vec<i64>, l: usize| Array2::from_shape_vec((v.len() / l, l), v).unwrap();
        let err = |ids: &Array2<i64>, mask: Option<&Array2<i64>>, say: &Wording| {
            check_tokens(ids.view(), mask.map(|m| m.view()), 5, 3, say)
                .unwrap_err()
                .to_string()
        };
        let good = ids(vec![1, 2, 3, 4], 2);
        assert!(check_tokens(good.view(), Some(good.mapv(|_| 1).view()), 5, 3, &BERT).is_ok());
        for (say, want) in [
            (
                &BERT,
                [
                    "input_ids is empty: shape (0, 2)",
                    "sequences of 4 tokens exceed max_position_embeddings = 3",
                    "attention_mask has shape (1, 2), input_ids (2, 2)",
                    "input_ids contains 5, outside the vocabulary 0..5",
                    "attention_mask must contain only 0 and 1",
                ],
            ),
            (
                &MULTITASK,
                [
                    "ids are empty: shape (0, 2)",
                    "4 tokens exceed the maximum of 3",
                    "mask has shape (1, 2), ids (2, 2)",
                    "ids contain 5, outside the vocabulary 0..5",
                    "mask must contain only 0 and 1",
                ],
            ),
        ] {
            let got = [
                err(&ids(vec![], 2), None, say),
                err(&ids(vec![1; 4], 4), None, say),
                err(&good, Some(&ids(vec![1, 1], 2)), say),
                err(&ids(vec![1, 5], 2), None, say),
                err(&good, Some(&good), say),
            ];
            for (g, w) in got.iter().zip(want) {
                assert!(g.ends_with(w), "{g:?} vs {w:?}");
            }
        }
    }
}
