"""The CRDT history strategies, now public in :mod:`syncfw.testing.strategies`."""

from syncfw.testing.strategies import (
    PLAIN_KINDS,
    History,
    any_interleaving,
    causal_interleaving,
    histories,
    msgpack_values,
    origin_order_interleaving,
    prefix_subset,
    read_ydoc,
    subset,
    ydoc_histories,
)

__all__ = [
    "PLAIN_KINDS",
    "History",
    "any_interleaving",
    "causal_interleaving",
    "histories",
    "msgpack_values",
    "origin_order_interleaving",
    "prefix_subset",
    "read_ydoc",
    "subset",
    "ydoc_histories",
]
