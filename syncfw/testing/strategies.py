"""Hypothesis strategies for ops, op chains and CRDT histories (needs ``hypothesis``,
a dev dependency; ``import syncfw.testing`` does not load this module until used).

Two families:

- log level: :data:`values` (application values), :func:`chains` (valid,
  hash-chained ops per origin), :func:`op_tuples` (op-shaped junk for decoders);
- CRDT level: a *history* is what a few replicas wrote while editing one key.
  Each replica writes ops against its own local state (so payloads are
  realistic: an OR-set remove carries the tags its writer saw, a register write
  the values it replaces, a counter op its origin's running totals, a Yjs
  update the edit of a real ``pycrdt.Doc``) and now and then pulls every op
  another replica holds. Each op also records the version vector its writer
  held when writing it (``History.deps``): the ops it may depend on. Orders
  that respect those are *causal*; orders that only keep each origin's seq
  order are what the log guarantees (:func:`causal_interleaving`,
  :func:`origin_order_interleaving`, :func:`any_interleaving`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pycrdt
from hypothesis import strategies as st

from syncfw.clock import HLC
from syncfw.crdt import COUNTER, KINDS, MVREG, ORSET, OpView
from syncfw.crdt.lww import TOMBSTONE
from syncfw.log import Op, encode_value
from syncfw.testing.ops import OpWriter

__all__ = [
    "PLAIN_KINDS",
    "History",
    "any_interleaving",
    "causal_interleaving",
    "chains",
    "histories",
    "msgpack_values",
    "op_tuples",
    "origin_order_interleaving",
    "prefix_subset",
    "read_ydoc",
    "subset",
    "values",
    "ydoc_histories",
]

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
"""Application values msgpack can carry."""


@st.composite
def chains(
    draw: st.DrawFn, *, origins: tuple[str, ...] = ("a", "b", "c"), max_len: int = 12
) -> dict[str, list[Op]]:
    """A valid, hash-chained op sequence per origin."""
    out: dict[str, list[Op]] = {}
    for origin in origins:
        writer = OpWriter(origin)
        n = draw(st.integers(0, max_len))
        out[origin] = [
            writer.write(
                f"k{draw(st.integers(0, 5))}", draw(values), hlc=draw(st.integers(0, 2**40))
            )
            for _ in range(n)
        ]
    return out


def op_tuples() -> st.SearchStrategy[tuple[object, ...]]:
    """Tuples shaped like ops but with arbitrary field values (for decoder fuzzing)."""
    field = st.none() | st.integers() | st.text(max_size=8) | st.binary(max_size=40)
    return st.tuples(*([field] * 10))


# --- CRDT histories ---------------------------------------------------------------------

PLAIN_KINDS = ("lww", "counter", "orset", "mvreg")
"""The kinds whose ops commute in any order (ydoc needs each origin's order)."""

T0 = 1_700_000_000_000

# Origin ids chosen so that their sort order differs from their creation order.
ORIGIN_NAMES = ("n2", "n10", "a", "zz", "n1")

Tag = tuple[str, int]


@dataclass
class History:
    """Ops written by simulated replicas, with what each writer meant.

    Attributes:
        kind: the CRDT kind.
        by_origin: each origin's ops, in seq order.
        deps: for each op id, the version vector its writer held before writing it.
        intents: for each op id, what the writer did: a counter delta, ``("add", e)``,
            ``("remove", e)``, a written value, a Yjs edit description.
    """

    kind: str
    by_origin: dict[str, list[OpView]]
    deps: dict[Tag, dict[str, int]] = field(default_factory=dict)
    intents: dict[Tag, Any] = field(default_factory=dict)

    @property
    def ops(self) -> list[OpView]:
        """Every op, origin by origin, each origin's in seq order."""
        return [op for origin in sorted(self.by_origin) for op in self.by_origin[origin]]

    def state_of(self, ops: Iterable[OpView]) -> Any:
        """A fresh state with ``ops`` applied in the given order."""
        t = KINDS[self.kind]
        return t.apply_many(t.empty(), list(ops))


def _clocks(draw: Callable[[Any], Any], n: int) -> tuple[list[HLC], list[int]]:
    """One HLC per replica over a shared wall clock (``wall[0]``, stepped by the caller,
    with a small skew per replica): equal timestamps across origins happen."""
    wall = [T0]
    skews = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))

    def make(i: int) -> HLC:
        return HLC(lambda: wall[0] + skews[i], max_offset_ms=1 << 40)

    return [make(i) for i in range(n)], wall


@st.composite
def histories(
    draw: Callable[[Any], Any], kind: str, *, replicas: int = 3, max_steps: int = 24
) -> History:
    """A history of ``kind`` (one of :data:`PLAIN_KINDS`) written by simulated replicas."""
    if kind not in PLAIN_KINDS:
        raise ValueError(f"use ydoc_histories for {kind!r}")
    t = KINDS[kind]
    n = draw(st.integers(1, replicas))
    names = list(ORIGIN_NAMES[:n])
    clocks, wall = _clocks(draw, n)
    states = [t.empty() for _ in range(n)]
    held: list[list[OpView]] = [[] for _ in range(n)]  # ops each replica holds, arrival order
    vv: list[dict[str, int]] = [{} for _ in range(n)]
    own: dict[str, list[OpView]] = {name: [] for name in names}
    history = History(kind, own)
    elements = [encode_value(e) for e in ("x", "y", 7)]

    steps = draw(st.integers(1, max_steps))
    for _ in range(steps):
        wall[0] += draw(st.sampled_from([0, 0, 1, 5, -2]))
        i = draw(st.integers(0, n - 1))
        if n > 1 and draw(st.integers(0, 3)) == 0:
            # replica i pulls every op replica j holds
            j = draw(st.integers(0, n - 1))
            for op in held[j]:
                if vv[i].get(op.origin, 0) < op.seq:
                    states[i] = t.apply(states[i], op)
                    clocks[i].observe(op.hlc)
                    held[i].append(op)
                    vv[i][op.origin] = op.seq
            continue
        name = names[i]
        seq = len(own[name]) + 1
        intent: Any
        if kind == "lww":
            if draw(st.integers(0, 5)) == 0:
                payload, intent = TOMBSTONE, None
            else:
                intent = draw(st.one_of(st.integers(-3, 3), st.text(max_size=3)))
                payload = encode_value(intent)
        elif kind == "counter":
            intent = draw(st.integers(-5, 5))
            payload = COUNTER.op_payload(states[i], name, intent)
        elif kind == "orset":
            element = draw(st.sampled_from(elements))
            if draw(st.booleans()):
                intent, payload = ("add", element), ORSET.add_payload(element)
            else:
                intent, payload = ("remove", element), ORSET.remove_payload(states[i], element)
        else:  # mvreg
            intent = draw(st.integers(0, 9))
            payload = MVREG.write_payload(states[i], encode_value(intent))
        op = OpView(name, seq, clocks[i].now(), payload)
        history.deps[(name, seq)] = dict(vv[i])
        history.intents[(name, seq)] = intent
        states[i] = t.apply(states[i], op)
        own[name].append(op)
        held[i].append(op)
        vv[i][name] = seq
    return history


# --- Yjs documents --------------------------------------------------------------


def read_ydoc(state: bytes) -> dict[str, Any]:
    """The content of a ydoc state: the text ``t``, the map ``m`` and the array ``a``."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    doc.apply_update(state)
    return {
        "t": str(doc.get("t", type=pycrdt.Text)),
        "m": doc.get("m", type=pycrdt.Map).to_py(),
        "a": doc.get("a", type=pycrdt.Array).to_py(),
    }


def _edit(draw: Callable[[Any], Any], doc: pycrdt.Doc[Any]) -> str:
    """One local edit of ``doc``; returns a description."""
    text = doc.get("t", type=pycrdt.Text)
    amap = doc.get("m", type=pycrdt.Map)
    array = doc.get("a", type=pycrdt.Array)
    what = draw(st.sampled_from(["ins", "ins", "ins", "del", "set", "unset", "push", "pop"]))
    size = len(str(text))
    if what == "del" and size:
        start = draw(st.integers(0, size - 1))
        end = draw(st.integers(start + 1, min(size, start + 4)))
        del text[start:end]
        return f"del t[{start}:{end}]"
    if what == "set" or (what == "unset" and not len(amap)):
        key, value = draw(st.sampled_from("xyz")), draw(st.integers(0, 99))
        amap[key] = value
        return f"set m[{key}]={value}"
    if what == "unset":
        key = draw(st.sampled_from(sorted(amap.keys())))
        del amap[key]
        return f"unset m[{key}]"
    if what == "push" or (what == "pop" and not len(array)):
        value = draw(st.integers(0, 99))
        array.insert(draw(st.integers(0, len(array))), value)
        return f"push a {value}"
    if what == "pop":
        index = draw(st.integers(0, len(array) - 1))
        del array[index]
        return f"pop a[{index}]"
    pos = draw(st.integers(0, size))
    # ASCII only: yrs indexes text by encoded units and panics on a misplaced multibyte index
    chunk = draw(st.text(alphabet="abcdef", min_size=1, max_size=4))
    text.insert(pos, chunk)
    return f"ins t[{pos}]={chunk!r}"


@st.composite
def ydoc_histories(
    draw: Callable[[Any], Any], *, replicas: int = 3, max_steps: int = 20
) -> History:
    """Real Yjs updates: each replica is a ``pycrdt.Doc(client_id=...)``; one edit, one op."""
    n = draw(st.integers(1, replicas))
    names = list(ORIGIN_NAMES[:n])
    docs: list[pycrdt.Doc[Any]] = [pycrdt.Doc(client_id=1000 + i) for i in range(n)]
    recording = [False]
    captured: list[bytes] = []

    def on_change(event: Any) -> None:
        if recording[0]:  # only local edits are this origin's ops, not what it pulled
            captured.append(event.update)

    subscriptions = [doc.observe(on_change) for doc in docs]
    own: dict[str, list[OpView]] = {name: [] for name in names}
    history = History("ydoc", own)
    held: list[list[OpView]] = [[] for _ in range(n)]
    vv: list[dict[str, int]] = [{} for _ in range(n)]
    steps = draw(st.integers(1, max_steps))
    for _ in range(steps):
        i = draw(st.integers(0, n - 1))
        if n > 1 and draw(st.integers(0, 2)) == 0:
            j = draw(st.integers(0, n - 1))
            for op in held[j]:
                if vv[i].get(op.origin, 0) < op.seq:
                    docs[i].apply_update(op.payload)
                    held[i].append(op)
                    vv[i][op.origin] = op.seq
            continue
        recording[0] = True
        try:
            with docs[i].transaction():
                intent = _edit(draw, docs[i])
        finally:
            recording[0] = False
        if not captured:  # an edit that changed nothing
            continue
        assert len(captured) == 1
        name = names[i]
        seq = len(own[name]) + 1
        op = OpView(name, seq, seq, captured.pop())
        history.deps[(name, seq)] = dict(vv[i])
        history.intents[(name, seq)] = intent
        own[name].append(op)
        held[i].append(op)
        vv[i][name] = seq
    for doc, sub in zip(docs, subscriptions, strict=True):
        doc.unobserve(sub)
    return history


# --- orders and subsets -----------------------------------------------------------------


def origin_order_interleaving(
    draw: Callable[[Any], Any], history: History, *, duplicates: bool = True
) -> list[OpView]:
    """Every op once, in an order that keeps each origin's seq order; duplicates of
    already delivered ops are sprinkled in (a re-delivery comes after its original)."""
    queues = {o: list(ops) for o, ops in history.by_origin.items() if ops}
    out: list[OpView] = []
    while queues:
        origin = draw(st.sampled_from(sorted(queues)))
        out.append(queues[origin].pop(0))
        if not queues[origin]:
            del queues[origin]
        if duplicates and draw(st.integers(0, 4)) == 0:
            out.append(draw(st.sampled_from(out)))
    return out


def causal_interleaving(
    draw: Callable[[Any], Any], history: History, *, duplicates: bool = True
) -> list[OpView]:
    """Every op once, each only after every op its writer held when writing it."""
    pending = {o: list(ops) for o, ops in history.by_origin.items() if ops}
    done: dict[str, int] = {}
    out: list[OpView] = []
    while pending:
        ready = sorted(
            o
            for o, ops in pending.items()
            if all(done.get(d, 0) >= s for d, s in history.deps[(o, ops[0].seq)].items())
        )
        origin = draw(st.sampled_from(ready))
        op = pending[origin].pop(0)
        done[origin] = op.seq
        out.append(op)
        if not pending[origin]:
            del pending[origin]
        if duplicates and draw(st.integers(0, 4)) == 0:
            out.append(draw(st.sampled_from(out)))
    return out


def any_interleaving(
    draw: Callable[[Any], Any], history: History, *, duplicates: bool = True
) -> list[OpView]:
    """Every op at least once, in any order at all."""
    ops = list(history.ops)
    if duplicates and ops:
        ops += draw(st.lists(st.sampled_from(ops), max_size=4))
    return list(draw(st.permutations(ops)))


def subset(draw: Callable[[Any], Any], ops: Sequence[OpView]) -> list[OpView]:
    """Any subset of ``ops``, order kept."""
    mask = draw(st.lists(st.booleans(), min_size=len(ops), max_size=len(ops)))
    return [op for op, keep in zip(ops, mask, strict=True) if keep]


def prefix_subset(
    draw: Callable[[Any], Any], history: History, *, causal: bool = False
) -> list[OpView]:
    """A set a replica could hold: a prefix of each origin's ops (seq order kept).

    With ``causal``, the set is also closed under the writers' dependencies
    (shrunk until every op's dependencies are in it).
    """
    cut = {o: draw(st.integers(0, len(ops))) for o, ops in sorted(history.by_origin.items())}
    if causal:
        changed = True
        while changed:
            changed = False
            for o, ops in history.by_origin.items():
                for op in ops[: cut[o]]:
                    if any(cut.get(d, 0) < s for d, s in history.deps[(o, op.seq)].items()):
                        cut[o] = op.seq - 1
                        changed = True
                        break
    return [op for o in sorted(history.by_origin) for op in history.by_origin[o][: cut[o]]]


# --- malformed input -------------------------------------------------------------------


def msgpack_values(*, safe: bool = True) -> st.SearchStrategy[Any]:
    """Arbitrary msgpack-able values, nested.

    ``safe`` leaves out the values that, at the time of writing, crash the CRDT
    decoders with a non-DecodeError (non-finite floats, ints too large for an
    index where bytes are expected); see the xfail tests in test_crdt_laws.py.
    """
    ints = (
        st.integers(-300, 300)
        if safe
        else st.one_of(st.integers(-300, 300), st.sampled_from([2**63, 2**64 - 1, -(2**63)]))
    )
    floats = st.floats(allow_nan=True, allow_infinity=not safe)
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        ints,
        floats,
        st.text(max_size=4),
        st.binary(max_size=6),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.one_of(st.text(max_size=2), st.integers(0, 3)), inner, max_size=3),
        ),
        max_leaves=12,
    )
