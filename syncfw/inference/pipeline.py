"""Pre, run, post for one batch of calls, on the worker thread.

Invariants:

1. Errors are per call: a call's bad input, NaN, failing pre- or
   post-processing or failing run fails that call only. A batch whose shared
   ``session.run`` (or batch-wide check) fails is rerun call by call, so one
   bad input cannot fail its batch-mates.
2. Inputs are checked against the signature the file declares (names,
   dtypes, fixed dimensions) before they reach ONNX Runtime; outputs are
   checked against the declared outputs (and row counts for a batch) before
   anything is made of them.
3. Nothing here touches the event loop or the node: the worker calls
   :meth:`Pipeline.work` in its thread and delivers what it returns.

Third-party errors (ONNX Runtime's pybind types, the user's pre/post
functions) are translated into :class:`~syncfw.errors.InferenceError`
subclasses here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from syncfw.inference.errors import (
    InferenceError,
    InferenceRunError,
    InputSignatureError,
    NonFiniteInputError,
    OutputSignatureError,
)
from syncfw.inference.latency import StageTimes
from syncfw.inference.prediction import Prediction, top_k, top_k_rows
from syncfw.inference.signature import ModelInfo, input_digest

__all__ = ["Array", "Feeds", "Loaded", "Outcome", "Pipeline", "PostFn", "PreFn", "check_outputs"]

Array = npt.NDArray[Any]
Feeds = dict[str, Array]
PreFn = Callable[[Any], "Mapping[str, Array] | Array"]
PostFn = Callable[[Mapping[str, Array]], "Prediction"]

# (index in the batch, feeds, queue seconds, pre seconds)
_Ready = tuple[int, Feeds, float, float]


@dataclass(slots=True)
class Loaded:
    """A loaded session and what is known about it (swapped as one reference).

    ``session`` is an ``onnxruntime.InferenceSession`` or a
    :class:`~syncfw.inference.isolation.ProcessSession` (``run``, ``get_providers``).
    """

    session: Any
    info: ModelInfo


@dataclass(slots=True)
class Outcome:
    """What the worker made of one call."""

    model: Loaded
    feeds: Feeds
    outputs: dict[str, Array]
    prediction: Prediction
    digest: str
    times: StageTimes
    batch_size: int


def check_outputs(info: ModelInfo, raw: Sequence[Any], rows: int | None) -> dict[str, Array]:
    """The outputs by name, once they match the declared outputs (and ``rows`` rows, if batchable).

    Raises:
        OutputSignatureError: a missing output, a wrong dtype or shape, or a row count
            that does not match the input's.
    """
    if len(raw) != len(info.outputs):
        raise OutputSignatureError(
            f"model {info.name!r} declares {len(info.outputs)} outputs but returned {len(raw)}"
        )
    outputs: dict[str, Array] = {}
    for spec, arr in zip(info.outputs, raw, strict=True):
        spec.check(arr, "output", OutputSignatureError)
        if info.batchable and rows is not None and arr.shape[0] != rows:
            raise OutputSignatureError(
                f"output {spec.name!r} has {arr.shape[0]} rows for {rows} input rows"
            )
        outputs[spec.name] = arr
    return outputs


class Pipeline:
    """The per-call work: preprocess and check, run (batched when it can), check and postprocess.

    Args:
        preprocess: a call's inputs to feeds (None: the inputs are the feeds).
        postprocess: one call's outputs to a :class:`Prediction` (None: :func:`top_k`).
        check_finite: refuse NaN and infinity in float inputs.
    """

    __slots__ = ("_check_finite", "_post", "_pre")

    def __init__(
        self, preprocess: PreFn | None, postprocess: PostFn | None, *, check_finite: bool
    ) -> None:
        self._pre = preprocess
        self._post = postprocess
        self._check_finite = check_finite

    def feeds_of(self, info: ModelInfo, inputs: Any) -> Feeds:
        """One call's feeds, checked against the declared inputs.

        Raises:
            InputSignatureError: not a mapping (or one array for a one-input model),
                wrong names, dtypes or shapes.
        """
        raw = self._pre(inputs) if self._pre is not None else inputs
        if isinstance(raw, np.ndarray):
            if len(info.inputs) != 1:
                raise InputSignatureError(
                    f"model {info.name!r} has {len(info.inputs)} inputs "
                    f"({[s.name for s in info.inputs]}); pass a mapping of name to array"
                )
            raw = {info.inputs[0].name: raw}
        if not isinstance(raw, Mapping):
            raise InputSignatureError(
                f"inputs must be a mapping of input name to numpy array, got {type(raw).__name__}"
            )
        want = {s.name for s in info.inputs}
        got = set(raw)
        if got != want:
            raise InputSignatureError(
                f"model {info.name!r} takes inputs {sorted(want)}, got {sorted(map(str, got))}"
            )
        feeds: Feeds = {}
        for spec in info.inputs:
            arr = raw[spec.name]
            spec.check(arr, "input", InputSignatureError)
            feeds[spec.name] = arr
        return feeds

    def check_finite_feeds(self, feeds: Mapping[str, Array]) -> None:
        """Refuse NaN and infinity; run on a whole micro-batch at once (one reduction per input).

        Raises:
            NonFiniteInputError: a float input holds NaN or an infinity.
        """
        if not self._check_finite:
            return
        for name, arr in feeds.items():
            # min and max propagate NaN and expose ±inf: two allocation-free reductions.
            if (
                arr.dtype.kind == "f"
                and arr.size
                and not (math.isfinite(float(arr.min())) and math.isfinite(float(arr.max())))
            ):
                bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                raise NonFiniteInputError(f"input {name!r} holds {bad} NaN or infinite values")

    def predict(self, info: ModelInfo, outputs: Mapping[str, Array]) -> Prediction:
        """One call's prediction (the user's postprocess, else :func:`top_k` on the first output).

        Raises:
            InferenceRunError: postprocess returned something other than a Prediction.
        """
        if self._post is not None:
            pred = self._post(outputs)
            if not isinstance(pred, Prediction):
                raise InferenceRunError(
                    f"postprocess must return a Prediction, got {type(pred).__name__}"
                )
            return pred
        return top_k(outputs[info.outputs[0].name], info.labels)

    def work(
        self, loaded: Loaded, batch: Sequence[tuple[Any, float]]
    ) -> list[Outcome | InferenceError]:
        """Pre, run, post for a batch of ``(inputs, enqueued perf_counter)`` calls.

        Returns:
            One outcome or error per call, in order.
        """
        info = loaded.info
        started = time.perf_counter()
        results: list[Outcome | InferenceError | None] = [None] * len(batch)
        ready: list[_Ready] = []
        for i, (inputs, enqueued) in enumerate(batch):
            t0 = time.perf_counter()
            try:
                feeds = self.feeds_of(info, inputs)
            except InferenceError as exc:
                results[i] = exc
                continue
            except Exception as exc:  # the user's preprocess raised
                results[i] = InferenceRunError(f"preprocess raised {type(exc).__name__}: {exc}")
                continue
            ready.append((i, feeds, started - enqueued, time.perf_counter() - t0))
        # One run for the whole batch; if it fails, run the calls one by one so a
        # single bad input cannot fail its batch-mates.
        groups = [ready] if len(ready) > 1 and info.batchable else [[r] for r in ready]
        for group in groups:
            try:
                self._run_group(loaded, group, results, batch_size=len(group))
            except InferenceError as exc:
                if len(group) == 1:
                    results[group[0][0]] = exc
                    continue
                for item in group:
                    try:
                        self._run_group(loaded, [item], results, batch_size=1)
                    except InferenceError as exc1:
                        results[item[0]] = exc1
        out: list[Outcome | InferenceError] = []
        for r in results:
            assert r is not None
            out.append(r)
        return out

    def _run_group(
        self,
        loaded: Loaded,
        group: Sequence[_Ready],
        results: list[Outcome | InferenceError | None],
        *,
        batch_size: int,
    ) -> None:
        info = loaded.info
        if len(group) == 1:
            feeds = group[0][1]
            rows = [next(iter(feeds.values())).shape[0]] if info.batchable else [0]
        else:
            feeds = {
                s.name: np.concatenate([g[1][s.name] for g in group], axis=0) for s in info.inputs
            }
            rows = [g[1][info.inputs[0].name].shape[0] for g in group]
        # Batch-wide: if it fails, work() reruns the calls one by one to find the culprit.
        self.check_finite_feeds(feeds)
        t0 = time.perf_counter()
        try:
            raw = loaded.session.run(None, feeds)
        except InferenceError:  # a ProcessSession's own (WorkerDied, a run error in the child)
            raise
        except Exception as exc:  # ORT's pybind errors are translated here
            raise InferenceRunError(
                f"{info.name!r} failed in session.run: {type(exc).__name__}: {exc}"
            ) from None
        infer_s = time.perf_counter() - t0
        outputs = check_outputs(info, raw, sum(rows) if info.batchable else None)
        starts = [0]
        for n in rows[:-1]:
            starts.append(starts[-1] + n)
        batch_preds: list[Prediction] | None = None
        shared_post_s = 0.0
        if self._post is None and len(group) > 1:
            # The default post-processing, vectorised over the batch; its time is shared.
            t1 = time.perf_counter()
            first = outputs[info.outputs[0].name]
            batch_preds = top_k_rows(first.reshape(first.shape[0], -1)[starts], info.labels)
            shared_post_s = (time.perf_counter() - t1) / len(group)
        for j, ((i, call_feeds, queue_s, pre_s), n) in enumerate(zip(group, rows, strict=True)):
            mine = (
                outputs
                if len(group) == 1
                else {k: v[starts[j] : starts[j] + n] for k, v in outputs.items()}
            )
            t1 = time.perf_counter()
            if batch_preds is not None:
                pred = batch_preds[j]
            else:
                try:
                    pred = self.predict(info, mine)
                except InferenceError as exc:
                    results[i] = exc
                    continue
                except Exception as exc:  # the user's postprocess raised
                    results[i] = InferenceRunError(
                        f"postprocess raised {type(exc).__name__}: {exc}"
                    )
                    continue
            digest = input_digest(call_feeds)
            post_s = time.perf_counter() - t1 + shared_post_s
            results[i] = Outcome(
                model=loaded,
                feeds=call_feeds,
                outputs=mine,
                prediction=pred,
                digest=digest,
                times=StageTimes(queue_s, pre_s, infer_s, post_s),
                batch_size=batch_size,
            )
