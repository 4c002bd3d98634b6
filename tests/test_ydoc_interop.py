"""Real Yjs (npm ``yjs``, driven by tests/yjs/peer.mjs) through syncfw nodes, and back.

Browsers make concurrent edits of text, maps and arrays (deletes and
formatting too), partially sync among themselves, and send their updates to
different nodes, which relay them in-process or over the gRPC mesh. Every
node's document must then equal Yjs's own merge of what the nodes received,
read by a real ``Y.Doc``: from the log (``doc_state``) and from the live
doc, and again after a restart. The other way, syncfw edits load into a real
``Y.Doc`` by the incremental state-vector exchange.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from conftest import FLEET, NodeFactory, exchange
from yjs.client import YjsPeer, unavailable

from syncfw import Node
from syncfw.errors import DecodeError
from syncfw.mesh import MeshConfig
from syncfw.testing import wait_until

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

KEY = "site/notes"


@pytest.fixture
def yjs() -> Iterator[YjsPeer]:
    with YjsPeer() as peer:
        yield peer


def read_back(yjs: YjsPeer, update: bytes, name: str) -> dict[str, Any]:
    """What a fresh real ``Y.Doc`` makes of ``update``."""
    yjs.new(name)
    yjs.apply(name, update)
    return yjs.content(name)


async def deliver(node: Node, updates: list[bytes], via_doc: bool) -> None:
    """A server relaying a browser's updates: through ``apply_update`` or the live doc."""
    if via_doc:
        doc = await node.doc(KEY)
        for u in updates:
            doc.apply_update(u)  # the obvious path: must lose nothing
        await node.flush()
    else:
        for u in updates:
            await node.apply_update(KEY, u)


async def browsers_and_nodes(
    yjs: YjsPeer, nodes: list[Node], rounds: int, seed: int, sync: Any
) -> list[bytes]:
    """Four browsers editing concurrently; returns every update the nodes received."""
    rnd = random.Random(seed)
    names = [f"b{i}" for i in range(4)]
    for i, name in enumerate(names):
        yjs.new(name, client=100 + i)
    received: list[bytes] = []
    for r in range(rounds):
        for i, name in enumerate(names):
            yjs.edits(name, rnd.randint(3, 12), seed * 1000 + r * 10 + i)
        for _ in range(2):  # partial syncs among the browsers themselves
            a, b = rnd.sample(names, 2)
            yjs.sync(a, b)
        for i, name in enumerate(names):
            ups = yjs.outbox(name)
            received += ups
            await deliver(nodes[i % len(nodes)], ups, via_doc=(r + i) % 2 == 1)
        await sync(rnd)
    return received


async def test_browsers_through_three_nodes_equal_yjs_merge_also_after_restart(
    make_node: NodeFactory, tmp_path: Path, yjs: YjsPeer
) -> None:
    nodes = [await make_node(f"n{i}") for i in range(3)]
    live = [await n.doc(KEY) for n in nodes]  # open before: remote ops must reach them

    async def sync(rnd: random.Random) -> None:
        a, b = rnd.sample(nodes, 2)
        await exchange(a, b)

    received = await browsers_and_nodes(yjs, nodes, rounds=10, seed=3, sync=sync)
    for a, b in ((nodes[0], nodes[1]), (nodes[1], nodes[2]), (nodes[0], nodes[1])):
        await exchange(a, b)
    expected = yjs.merge(received)
    assert len(expected["t"]) > 100 and expected["m"] and expected["a"]
    for i, (n, doc) in enumerate(zip(nodes, live, strict=True)):
        assert read_back(yjs, await n.doc_state(KEY), f"log{i}") == expected
        assert read_back(yjs, doc.get_update(), f"live{i}") == expected
        assert str(doc.get("t", type=pycrdt.Text)) == expected["t"]
    assert len({await n.state_digest() for n in nodes}) == 1

    for n in nodes:
        await n.close()
    for i in range(3):
        again = await Node.open(tmp_path / f"n{i}.db", node_id=f"n{i}", fleet=FLEET)
        try:
            assert read_back(yjs, await again.doc_state(KEY), f"restart{i}") == expected
            doc = await again.doc(KEY)
            assert str(doc.get("t", type=pycrdt.Text)) == expected["t"]
        finally:
            await again.close()


async def test_an_update_waiting_on_another_clients_edit_is_kept(
    make_node: NodeFactory, tmp_path: Path, yjs: YjsPeer
) -> None:
    """The issue's case: B saw A's 'hello ' and types 'world' at n2 before n2 has A's edit."""
    n1, n2 = await make_node("n1"), await make_node("n2")
    yjs.new("A", client=1)
    yjs.new("B", client=2)
    yjs.insert("A", 0, "hello ")
    (hello,) = yjs.outbox("A")
    yjs.apply("B", hello)
    yjs.insert("B", 6, "world")
    (world,) = yjs.outbox("B")
    doc2 = await n2.doc(KEY)
    doc2.apply_update(world)  # through the live doc: waits on A's struct
    await n2.flush()
    assert (await n2.version_vector())["n2"] == 1  # one op, the bytes as sent
    await n1.apply_update(KEY, hello)
    await exchange(n1, n2)
    doc1 = await n1.doc(KEY)
    for doc in (doc1, doc2):
        assert str(doc.get("t", type=pycrdt.Text)) == "hello world"
    for n in (n1, n2):
        assert read_back(yjs, await n.doc_state(KEY), f"s-{n.node_id}")["t"] == "hello world"
    await n2.close()
    again = await Node.open(tmp_path / "n2.db", node_id="n2", fleet=FLEET)
    try:
        doc = await again.doc(KEY)
        assert str(doc.get("t", type=pycrdt.Text)) == "hello world"
    finally:
        await again.close()


async def test_browsers_through_nodes_over_the_grpc_mesh(
    make_node: NodeFactory, yjs: YjsPeer
) -> None:
    nodes = [await make_node(f"g{i}") for i in range(3)]
    first = await nodes[0].serve("127.0.0.1:0", config=MeshConfig.test())
    for n in nodes[1:]:
        await n.serve("127.0.0.1:0", [first.address], config=MeshConfig.test())

    async def no_sync(rnd: random.Random) -> None:
        return None  # the mesh carries it

    received = await browsers_and_nodes(yjs, nodes, rounds=6, seed=11, sync=no_sync)
    expected = yjs.merge(received)
    want = [await nodes[0].version_vector()]

    async def converged() -> bool:
        vvs = [await n.version_vector() for n in nodes]
        want[0] = vvs[0]
        return all(v == vvs[0] for v in vvs) and all(len(v) == 3 for v in vvs)

    await wait_until(converged, timeout_s=30, what="the mesh to carry every browser's updates")
    for i, n in enumerate(nodes):
        assert read_back(yjs, await n.doc_state(KEY), f"mesh{i}") == expected
        doc = await n.doc(KEY)
        assert str(doc.get("t", type=pycrdt.Text)) == expected["t"]


async def test_syncfw_edits_load_into_real_yjs_by_state_vector_exchange(
    make_node: NodeFactory, yjs: YjsPeer
) -> None:
    n = await make_node("n1")
    doc = await n.doc(KEY)
    text = doc.get("t", type=pycrdt.Text)
    text.insert(0, "pump 4 ")
    doc.get("m", type=pycrdt.Map)["shift"] = "night"
    await n.flush()
    yjs.new("br", client=7)
    feed = n.doc_updates(KEY)
    first = await n.doc_state(KEY)
    yjs.apply("br", first)  # step 1: the whole document
    assert yjs.content("br")["t"] == "pump 4 "
    text.insert(len(text), "pressure low")  # more syncfw edits
    await n.flush()
    yjs.insert("br", 0, "note: ")  # and a browser edit, sent to the node
    for u in yjs.outbox("br"):
        await n.apply_update(KEY, u)
    diff = await n.doc_state(KEY, yjs.state_vector("br"))  # step 2: only what it lacks
    assert len(diff) < len(await n.doc_state(KEY))
    yjs.apply("br", diff)
    assert yjs.content("br")["t"] == str(text) == "note: pump 4 pressure low"
    assert yjs.content("br")["m"] == {"shift": "night"}
    # the per-doc feed carried the edit and the browser's update, in commit order
    pushed = [await feed.__anext__(), await feed.__anext__()]
    yjs.new("late")
    yjs.apply("late", first)
    for u in pushed:
        yjs.apply("late", u)
    assert yjs.content("late")["t"] == "note: pump 4 pressure low"
    await feed.aclose()
    with pytest.raises(DecodeError, match="state vector"):
        await n.doc_state(KEY, b"\xff\xff\xff")


async def test_real_yjs_v2_updates_are_refused_at_every_door(
    make_node: NodeFactory, yjs: YjsPeer
) -> None:
    n = await make_node("n1")
    doc = await n.doc(KEY)
    yjs.new("A", client=1)
    yjs.edits("A", 40, 5)
    v2 = yjs.state_v2("A")
    small_v2 = [yjs.to_v2(u) for u in yjs.outbox("A")]
    for update in [v2, *small_v2]:
        with pytest.raises(DecodeError, match="v2"):
            await n.apply_update(KEY, update)
        with pytest.raises(DecodeError, match="v2"):
            doc.apply_update(update)
    assert await n.version_vector() == {}
    assert doc.get_update() == pycrdt.Doc().get_update()
