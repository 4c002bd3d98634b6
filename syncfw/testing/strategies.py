"""Hypothesis strategies for ops and op chains (needs ``hypothesis``, a test dependency)."""

from __future__ import annotations

from hypothesis import strategies as st

from syncfw.log import Op
from syncfw.testing.ops import OpWriter

__all__ = ["chains", "op_tuples", "values"]

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
