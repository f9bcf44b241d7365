"""A character-level transformer language model as a twa_ray task: not image classification,
LayerNorm and no BatchNorm, perplexity as the metric (lower is better).

The text ships with Python: the help topics of ``pydoc`` (``pydoc_data.topics``, about 465k
characters of English prose and code), read in a fixed order. It is cut into windows of
``context + 1`` characters; the first 90 % of the text trains, the next 5 % is val (TWA-v's
data and every selection), the last 5 % is test.

    twa-ray run --config examples/char_lm.yaml          # from the checkout's root
    # the config says:  task: examples.char_lm:CharLM    task_args: {context: 64, ...}

Batches are (B, context + 1) int64 character ids; the model maps (B, T) ids to (B, T, vocab)
logits. Metrics: ``loss`` (mean next-character cross-entropy in nats, per character) and
``ppl`` = exp(loss), which selects.
"""
from __future__ import annotations

import math
import string
from typing import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from twa_ray.tasks import TaskBase, TaskData

VOCAB = string.printable  # 100 characters; anything else maps to UNKNOWN
UNKNOWN = len(VOCAB)
SPLITS = (0.90, 0.05, 0.05)  # train, val, test: consecutive parts of the text


def python_text(max_chars: int | None = None) -> str:
    """The text of Python's pydoc help topics, in sorted topic order (first ``max_chars``)."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    return text[:max_chars] if max_chars else text


def encode(text: str) -> torch.Tensor:
    """(len(text),) int64 ids: a character's index in ``VOCAB``, else ``UNKNOWN``."""
    index = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([index.get(c, UNKNOWN) for c in text], dtype=torch.long)


class Windows(Dataset):
    """Windows of ``length`` ids of ``ids`` starting every ``stride`` ids; item: (length,) int64."""

    def __init__(self, ids: torch.Tensor, length: int, stride: int) -> None:
        if len(ids) < length:
            raise ValueError(f"{len(ids)} characters make no window of {length}")
        self.ids, self.length = ids, length
        self.starts = list(range(0, len(ids) - length + 1, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.starts[i]
        return self.ids[s : s + self.length]


class TinyGPT(nn.Module):
    """A causal transformer over characters: token and position embeddings, ``layers``
    pre-LayerNorm blocks of ``heads``-head self-attention and an MLP, a final LayerNorm and
    a linear head. (B, T) ids -> (B, T, vocab) logits."""

    def __init__(self, vocab: int, context: int, d_model: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.token(ids) + self.position(torch.arange(t, device=ids.device))
        x = self.blocks(x, mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(x))


class CharLM(TaskBase):
    """Next-character prediction on Python's help text with :class:`TinyGPT`.

    Args (``task_args`` in the config): ``context`` characters a window predicts, ``stride``
    between windows (default: ``context``, no overlap), ``max_chars`` of the text to use (None:
    all), and the model's ``d_model``, ``layers``, ``heads``, ``dropout``.
    """

    metric = "ppl"
    higher_is_better = False

    def __init__(self, context: int = 64, stride: int | None = None, max_chars: int | None = None,
                 d_model: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.0) -> None:
        self.context, self.stride, self.max_chars = context, stride or context, max_chars
        self.model_args = dict(vocab=len(VOCAB) + 1, context=context, d_model=d_model, layers=layers, heads=heads,
                               dropout=dropout)

    def build_model(self) -> nn.Module:
        return TinyGPT(**self.model_args)

    def datasets(self) -> TaskData:
        ids = encode(python_text(self.max_chars))
        cut1, cut2 = int(SPLITS[0] * len(ids)), int((SPLITS[0] + SPLITS[1]) * len(ids))
        length = self.context + 1  # inputs and their next characters

        def windows(part: torch.Tensor) -> Windows:
            return Windows(part, length, self.stride)

        return TaskData(windows(ids[:cut1]), windows(ids[cut1:cut2]), windows(ids[cut2:]))

    def _token_losses(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """(B, T) next-character cross-entropies of a (B, T + 1) batch."""
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return self._token_losses(model, batch).mean(1).sum()  # each window's mean, summed over the batch

    def evaluate(self, model: nn.Module, batch: torch.Tensor) -> dict:
        losses = self._token_losses(model, batch)
        return {"loss": (losses.sum(), losses.numel())}

    def summarize(self, sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        out = super().summarize(sums)
        out["ppl"] = math.exp(out["loss"])
        return out
