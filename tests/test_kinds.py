"""One kind per key. A local write of another kind than the key holds raises and writes
nothing, declared or not. Where the fleet bootstrap declares a prefix's kind, a remote op
of another kind is rejected and recorded on every replica alike, whatever order the ops
arrive in; an undeclared key's remote ops cannot be judged so (what a key held when an op
arrived differs between replicas), so there the declaration is the fleet's tool."""

from __future__ import annotations

import asyncio
import itertools

import pycrdt
import pytest
from conftest import NodeFactory

from syncfw import Fleet, Grant, OpError
from syncfw.testing import MemoryReplica, OpWriter
from syncfw.zones import ZoneTable

FLEET = Fleet(
    fleet_id="kinds",
    grants=(Grant.of("site/", "*"),),
    kinds=(("site/tonnes/", "counter"), ("site/", "lww")),
)


def test_the_most_specific_declaration_wins_and_is_in_the_digest() -> None:
    z = ZoneTable(FLEET)
    assert z.kind_of("site/tonnes/pit1") == "counter"
    assert z.kind_of("site/door") == "lww"
    assert z.kind_of("fleet/n1/x") is None
    plain = Fleet(fleet_id="kinds", grants=FLEET.grants)
    assert plain.bootstrap_digest() != FLEET.bootstrap_digest()
    with pytest.raises(ValueError):
        Fleet(kinds=(("", "lww"),))


async def test_local_write_of_another_kind_raises(make_node: NodeFactory) -> None:
    node = await make_node("t1", fleet=FLEET)
    await node.counter("site/tonnes/pit1").add(5)
    with pytest.raises(OpError, match="counter values"):
        await node.put("site/tonnes/pit1", 1)
    with pytest.raises(OpError, match="lww values"):
        await node.counter("site/door").add(1)
    assert await node.counter("site/tonnes/pit1").value() == 5
    assert await node.get("site/tonnes/pit1") is None
    await node.put("fleet/t1/free", 1)  # undeclared, and lww like what it holds
    await node.put("fleet/t1/free", 2)
    assert await node.get("fleet/t1/free") == 2


async def test_an_undeclared_key_keeps_the_kind_it_holds(make_node: NodeFactory, tmp_path) -> None:
    node = await make_node("t7")
    k = "trucks/t7/"
    await node.counter(k + "tonnes").add(5)
    await node.put(k + "door", "open")
    await node.set(k + "crew").add("ana")
    await node.register(k + "mode").set("auto")
    vv = await node.version_vector()
    refused = [
        (node.put(k + "tonnes", 1), "counter values, not lww"),
        (node.counter(k + "door").add(1), "lww values, not counter"),
        (node.register(k + "crew").set("x"), "orset values, not mvreg"),
        (node.set(k + "mode").add("x"), "mvreg values, not orset"),
        (node.put_many({k + "tonnes": 1}), "counter values, not lww"),
    ]
    for call, words in refused:
        with pytest.raises(OpError, match=words):
            await call
    assert await node.version_vector() == vv  # nothing was written
    assert await node.counter(k + "tonnes").value() == 5
    assert await node.get(k + "tonnes") is None
    assert await node.get(k + "door") == "open"
    src = pycrdt.Doc()
    src.get("text", type=pycrdt.Text).insert(0, "bearing 3 hot")
    await node.apply_update(k + "notes", src.get_update())  # a new key: a document
    with pytest.raises(OpError, match="ydoc values, not lww"):
        await node.put(k + "notes", 1)


async def test_a_group_writing_two_kinds_at_a_new_key_keeps_the_first(
    make_node: NodeFactory,
) -> None:
    node = await make_node("t7")
    key = "trucks/t7/fresh"
    got = await asyncio.gather(
        node.counter(key).add(2), node.put(key, "x"), return_exceptions=True
    )
    assert not isinstance(got[0], BaseException)
    assert isinstance(got[1], OpError) and "counter values, not lww" in str(got[1])
    assert await node.counter(key).value() == 2
    assert await node.get(key) is None


async def test_the_kind_a_remote_op_brought_is_kept_after_a_restart(
    make_node: NodeFactory, tmp_path
) -> None:
    """The kinds a store holds are learned from what commits (remote ops too), and
    from the file at open."""
    t9 = OpWriter("t9", "site/", epoch=1)
    path = tmp_path / "r.db"
    node = await make_node("t7", path=path)
    await node.put("trucks/t7/a", 1)  # the store learns it holds lww only
    res = await node.apply_remote([t9.write("tally", [3, 0], kind="counter")])
    assert res.applied == 1
    with pytest.raises(OpError, match="counter values, not lww"):
        await node.put("site/tally", 1)
    await node.close()
    again = await make_node("t7", path=path)
    with pytest.raises(OpError, match="counter values, not lww"):
        await again.put("site/tally", 1)
    assert await again.counter("site/tally").value() == 3
    await again.put("site/other", 1)  # a key holding nothing takes any kind


async def test_remote_op_of_another_kind_is_rejected_identically(make_node: NodeFactory) -> None:
    a, b = OpWriter("n1", "site/", epoch=1), OpWriter("n2", "site/", epoch=1)
    good = b.write("door", "open")
    bad = a.write("door", 5, kind="counter")
    for order in itertools.permutations([good, bad]):
        mem = MemoryReplica("r", FLEET)
        await mem.apply_remote(list(order))
        assert mem.rejected == {bad.id: mem.rejected[bad.id]}
        assert "lww values" in mem.rejected[bad.id]
        assert mem.get("site/door") == "open"
    node = await make_node("r2", fleet=FLEET)
    res = await node.apply_remote([bad, good])
    assert (res.applied, res.rejected) == (1, 1)
    assert any("lww values" in r[3] for r in await node.store.rejected())
    assert await node.get("site/door") == "open"
