"""One kind per key where the fleet bootstrap declares it: a local write of another kind
raises and writes nothing; a remote op of another kind is rejected and recorded on every
replica alike, whatever order the ops arrive in."""

from __future__ import annotations

import itertools

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
    await node.put("fleet/t1/free", 1)  # undeclared: as before


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
