"""Release manifests: only the fleet authority's signature counts, versions only move forward,
and each refusal names its reason (and the node keeps what it had)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw import Fleet, ManifestError, Node, NotAuthorityError, ZoneOwnershipError
from syncfw.models import (
    Artifacts,
    build_manifest,
    judge_releases,
    manifest_key,
    open_manifest,
    seal_manifest,
)
from syncfw.testing import SignedFleet
from syncfw.transport.budget import Priority, TokenBucket

SF = SignedFleet(Fleet(fleet_id="releases", authority="depot"))
AUTH = SF.fleet.authority_key
SIG = {"inputs": [("x", "float32", (None, 4))], "outputs": [("y", "float32", (None, 2))]}
DATA = bytes(range(256)) * 100


def _m(version: int, issued: int, data: bytes = DATA):  # type: ignore[no-untyped-def]
    return build_manifest(data, name="inspection", version=version, chunk_size=4096,
                          issued=issued, **SIG)  # type: ignore[arg-type]


def test_a_sealed_manifest_opens_against_the_authority_key() -> None:
    m = _m(7, 100)
    got = open_manifest(seal_manifest(m, SF.authority_key, "releases"), AUTH, "releases")
    assert (got.name, got.version, got.sha256, got.chunks) == (m.name, 7, m.sha256, m.chunks)
    assert got.inputs == (("x", "float32", (None, 4)),)
    assert got.key == "sys/models/inspection/7"
    assert len(got.chunks) == -(-len(DATA) // 4096)


@pytest.mark.parametrize(
    ("reason", "value"),
    [
        ("unsigned", lambda m: msgpack.packb(m.body("releases"))),
        ("unsigned", lambda m: msgpack.packb([m.body("releases"), AUTH, b""])),
        ("not_authority", lambda m: seal_manifest(m, Ed25519PrivateKey.generate(), "releases")),
        ("bad_signature", lambda m: msgpack.packb([m.body("releases"), AUTH, b"\x01" * 64])),
        ("other_fleet", lambda m: seal_manifest(m, SF.authority_key, "another")),
        ("malformed", lambda m: b"\xc1garbage"),
        ("malformed", lambda m: b"x" * (600 << 10)),
    ],
)
def test_each_bad_manifest_is_refused_with_its_reason(reason: str, value) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ManifestError) as err:
        open_manifest(value(_m(1, 1)), AUTH, "releases")
    assert err.value.reason == reason, str(err.value)


def test_a_tampered_body_fails_the_signature() -> None:
    body, signer, sig = msgpack.unpackb(seal_manifest(_m(3, 1), SF.authority_key, "releases"))
    forged = msgpack.packb([body.replace(b"inspection", b"inspectioN"), signer, sig])
    with pytest.raises(ManifestError) as err:
        open_manifest(forged, AUTH, "releases")
    assert err.value.reason == "bad_signature"


def test_versions_only_move_forward_whatever_order_they_arrive_in() -> None:
    seal = lambda m: open_manifest(seal_manifest(m, SF.authority_key, "releases"), AUTH, "releases")  # noqa: E731
    v5, v7, back, again = seal(_m(5, 10)), seal(_m(7, 20)), seal(_m(6, 30)), seal(_m(7, 40, DATA[:-1]))
    rollback = seal(_m(8, 50, DATA[:5000]))
    for order in ([v5, v7, back, again, rollback], [rollback, again, back, v7, v5]):
        j = judge_releases(order)
        assert [m.version for m in j.accepted] == [5, 7, 8]
        assert {(m.version, r) for m, r, _ in j.refused} == {(6, "backwards"), (7, "reused_version")}
        assert j.latest is not None and j.latest.version == 8


async def _node(tmp: Path, node_id: str) -> Node:
    return await Node.open(tmp / f"{node_id}.db", node_id=node_id, fleet=SF.fleet,
                           keys=SF.keys(node_id))


async def test_publish_is_the_authoritys_and_refuses_a_backwards_version(tmp_path: Path) -> None:
    depot = await _node(tmp_path, "depot")
    truck = await _node(tmp_path, "t1")
    try:
        arts = Artifacts.attach(depot)
        m = await arts.publish(DATA, name="inspection", version=7, key=SF.authority_key, **SIG)  # type: ignore[arg-type]
        assert (await arts.latest("inspection")) == m
        assert arts.held(m) and await arts.read(m) == DATA
        with pytest.raises(ManifestError, match="only move forward") as err:
            await arts.publish(DATA, name="inspection", version=7, key=SF.authority_key, **SIG)  # type: ignore[arg-type]
        assert err.value.reason == "backwards"
        with pytest.raises(ManifestError) as err:
            await arts.publish(DATA, name="inspection", version=8, key=Ed25519PrivateKey.generate(), **SIG)  # type: ignore[arg-type]
        assert err.value.reason == "not_authority"
        with pytest.raises(NotAuthorityError):
            await Artifacts.attach(truck).publish(
                DATA, name="inspection", version=9, key=SF.authority_key, **SIG)  # type: ignore[arg-type]
        with pytest.raises(ZoneOwnershipError):  # sys/ is the authority's, in the log too
            await truck.put(manifest_key("inspection", 9), seal_manifest(_m(9, 1), SF.authority_key, "releases"))
    finally:
        await depot.close()
        await truck.close()


async def test_bad_manifests_in_the_log_are_refused_recorded_and_the_latest_stands(tmp_path: Path) -> None:
    depot = await _node(tmp_path, "depot")
    try:
        arts = Artifacts.attach(depot)
        good = await arts.publish(DATA, name="inspection", version=7, key=SF.authority_key, **SIG)  # type: ignore[arg-type]
        # what a compromised publisher path or a bug could write beside it
        await depot.put(manifest_key("inspection", 5),
                        seal_manifest(_m(5, depot.hlc_now()), SF.authority_key, "releases"))
        await depot.put(manifest_key("inspection", 9), msgpack.packb(_m(9, depot.hlc_now()).body("releases")))
        await depot.put(manifest_key("inspection", 10),
                        seal_manifest(_m(10, depot.hlc_now()), Ed25519PrivateKey.generate(), "releases"))
        assert (await arts.latest("inspection")) == good
        assert arts.refused == {
            "sys/models/inspection/5": ("backwards", arts.refused["sys/models/inspection/5"][1]),
            "sys/models/inspection/9": ("unsigned", arts.refused["sys/models/inspection/9"][1]),
            "sys/models/inspection/10": ("not_authority", arts.refused["sys/models/inspection/10"][1]),
        }
        await arts.releases()  # judged again: counted once each
        st = (await depot.status())["artifacts"]
        assert st["manifests_refused"] == {"backwards": 1, "not_authority": 1, "unsigned": 1}
        assert st["refused"]["sys/models/inspection/9"] == "unsigned"
    finally:
        await depot.close()


async def test_bulk_spends_wait_while_state_spends_wait() -> None:
    now = [0.0]

    async def sleep(s: float) -> None:
        await asyncio.sleep(0)
        now[0] += s

    bucket = TokenBucket(1000, 1000, clock=lambda: now[0], sleep=sleep)
    await bucket.spend(1000)  # empty
    order: list[str] = []

    async def go(name: str, n: int, p: Priority) -> None:
        await bucket.spend(n, p)
        order.append(name)

    bulk = asyncio.create_task(go("chunk", 500, Priority.BULK))
    await asyncio.sleep(0)
    state = asyncio.create_task(go("state", 500, Priority.STATE))
    await asyncio.gather(bulk, state)
    assert order == ["state", "chunk"]
    assert bucket.spent_by == {Priority.STATE: 1500, Priority.BULK: 500}
