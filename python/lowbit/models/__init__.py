"""A small multi-task vision-language model: one shared ViT encoder, four task heads.

``MultiTaskVLM`` is the PyTorch reference (for training); :class:`lowbit.runtime.MultiTaskModel`
is its Rust twin, loaded from the file :func:`save` writes. Heads:

* **caption**: a pre-LN transformer decoder with causal self-attention and cross-attention to
  the image tokens (greedy or beam decoding);
* **ocr**: CTC over the columns of the patch grid (``ocr_steps`` time steps per column);
* **vqa**: a question encoder (self-attention plus cross-attention to the image tokens), a
  classifier over :data:`lowbit.data.ANSWERS` on its first (``[CLS]``) token;
* **retrieval**: the mean image token projected to ``embed_dim``, and a BERT text tower
  (``transformers.BertModel``, so a pretrained checkpoint's weights can be loaded into it),
  mean-pooled and projected, both L2-normalised, trained contrastively.

``model(images, task=...)`` routes to one head and runs nothing else.

>>> import torch
>>> from lowbit.models import MultiTaskConfig, MultiTaskVLM
>>> cfg = MultiTaskConfig(width=32, depth=1, heads=2, decoder_depth=1, vqa_depth=1, embed_dim=16,
...                       text={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
...                             "intermediate_size": 64})
>>> MultiTaskConfig.from_json(cfg.to_json()) == cfg
True
>>> model = MultiTaskVLM(cfg).eval()
>>> images = torch.rand(2, 3, 64, 64)
>>> model(images, task="ocr").shape          # (batch, 8 columns x 2 steps, 36 characters + blank)
torch.Size([2, 16, 37])
>>> len(model.caption(images, max_len=5)), len(model.vqa(images, ["what color is the circle ?"] * 2))
(2, 2)

The package holds one concern per module: :mod:`~lowbit.models.modules` (the PyTorch
modules and decoding), :mod:`~lowbit.models.files` (save / load in every weight format),
:mod:`~lowbit.models.qat` (quantization-aware training), :mod:`~lowbit.models.training` and
:mod:`~lowbit.models.evaluation`; :class:`MultiTaskConfig` lives in :mod:`lowbit._multitask`,
which the runtime shares without importing torch.
"""

from lowbit._multitask import CONFIG_KEY, WEIGHTS, MultiTaskConfig
from lowbit.models.evaluation import evaluate
from lowbit.models.files import load, save
from lowbit.models.modules import MultiTaskVLM
from lowbit.models.qat import QATLinear, quantize_for_training
from lowbit.models.training import LOSS_WEIGHTS, calibration_batches, multitask_loss, train

__all__ = [
    "CONFIG_KEY",
    "LOSS_WEIGHTS",
    "WEIGHTS",
    "MultiTaskConfig",
    "MultiTaskVLM",
    "QATLinear",
    "calibration_batches",
    "evaluate",
    "load",
    "multitask_loss",
    "quantize_for_training",
    "save",
    "train",
]
