"""Predictions: the decision drawn from a model's outputs, and the default way to draw it.

Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from syncfw.inference.errors import OutputSignatureError

__all__ = ["Prediction", "top_k", "top_k_rows"]

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Prediction:
    """The decision a post-processing function draws from the outputs.

    Attributes:
        label: the top label.
        confidence: its score in ``[0, 1]``.
        top: the best few ``(label, score)`` pairs, best first.
    """

    label: str
    confidence: float
    top: tuple[tuple[str, float], ...] = ()


def top_k(scores: Array, labels: Sequence[str], k: int = 3) -> Prediction:
    """The default post-processing: class scores to a :class:`Prediction`.

    Args:
        scores: class scores (probabilities, or logits, which get a softmax); for
            a call carrying several rows, the first row is the one judged.
        labels: class names; indices are used past their end.
        k: how many ``(label, score)`` pairs to keep.

    Returns:
        The top label, its probability and the top ``k``.

    Raises:
        OutputSignatureError: no scores at all.
    """
    arr = np.asarray(scores)
    rows = arr.reshape(1, -1) if arr.ndim < 2 else arr.reshape(arr.shape[0], -1)[:1]
    return top_k_rows(rows, labels, k)[0]


def _top_k_row(s: list[float], labels: Sequence[str], k: int) -> Prediction:
    # Plain Python for one short row: numpy's per-call overhead dominates at this size.
    if min(s) < 0.0 or max(s) > 1.0 or abs(sum(s) - 1.0) > 1e-3:
        m = max(s)  # logits, not probabilities: normalise them
        e = [math.exp(v - m) for v in s]
        total = sum(e)
        s = [v / total for v in e]
    order = sorted(range(len(s)), key=lambda i: -s[i])[:k]
    n_labels = len(labels)
    top = tuple((labels[i] if i < n_labels else str(i), round(s[i], 6)) for i in order)
    return Prediction(label=top[0][0], confidence=top[0][1], top=top)


def top_k_rows(scores: Array, labels: Sequence[str], k: int = 3) -> list[Prediction]:
    """:func:`top_k` for every row of a 2-D score array at once (one numpy pass per batch).

    Raises:
        OutputSignatureError: a row with no scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise OutputSignatureError("the model returned no class scores")
    if s.shape[0] == 1 and s.shape[1] <= 64:
        return [_top_k_row(s[0].tolist(), labels, k)]
    is_prob = (
        (s.min(axis=1) >= 0.0) & (s.max(axis=1) <= 1.0) & (np.abs(s.sum(axis=1) - 1.0) <= 1e-3)
    )
    if not is_prob.all():  # logits, not probabilities: normalise those rows
        e = np.exp(s - s.max(axis=1, keepdims=True))
        s = np.where(is_prob[:, None], s, e / e.sum(axis=1, keepdims=True))
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    values = np.round(np.take_along_axis(s, order, axis=1), 6).tolist()
    n_labels = len(labels)
    preds: list[Prediction] = []
    for idx_row, val_row in zip(order.tolist(), values, strict=True):
        top = tuple(
            (labels[i] if i < n_labels else str(i), v)
            for i, v in zip(idx_row, val_row, strict=True)
        )
        preds.append(Prediction(label=top[0][0], confidence=top[0][1], top=top))
    return preds
