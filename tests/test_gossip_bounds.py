"""Bounded gossip: a peer that gossips 10k invented members cannot grow the member
table past its cap, push the node's own Peers frame past the frame cap, make it
dial more new addresses than its rate allows, or stop it syncing with an honest
peer; invalid addresses are refused, counted and logged (rate-limited)."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest

from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.mesh import (
    GossipBounds,
    GossipGuard,
    Membership,
    MemberState,
    Mesh,
    MeshConfig,
    TokenBucket,
    check_address,
    check_node_id,
)
from syncfw.mesh.addresses import MAX_NODE_ID_CHARS
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices, clip
from syncfw.sync import PROTOCOL_VERSION, Hello, LearnPeers, PeerInfo, Peers, Session
from syncfw.sync.frames import Status
from syncfw.testing import MemoryReplica, wait_until
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.memory import Handler, MemoryNetwork
from syncfw.transport.network import GrpcNetwork, InMemoryNetwork, Listener, Network
from syncfw.transport.probe import ProbeAnswer, ProbeHandler
from syncfw.transport.wire import MAX_FRAME_BYTES, encode_frame

# -- addresses and node ids (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1:7000", "yard-3.example.com:443", "[::1]:7000", "n0.local.:65535", "h:1"],
)
def test_valid_addresses_are_accepted(address: str) -> None:
    assert check_address(address) is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "host",  # no port
        "host:0",
        "host:65536",
        "host:7e3",
        "host:-1",
        "::1:7000",  # unbracketed IPv6: the port is ambiguous
        "[nope]:7000",
        "a b:1",
        "-bad-:1",
        "1.2.3:80",  # numeric last label: neither a name nor an IPv4 literal
        "999.1.1.1:80",
        "héllo:1",
        "\x1b[31mred:1",
        "x" * 300 + ":1",
        ("a" * 64) + ".example:1",  # a label over 63 characters
    ],
)
def test_invalid_addresses_are_refused(address: str) -> None:
    assert check_address(address) == "bad_address"


def test_bare_names_only_where_ports_are_not_required() -> None:
    assert check_address("n0") == "bad_address"
    assert check_address("n0", require_port=False) is None
    assert check_address("n0:12", require_port=False) is None
    assert check_address("n 0", require_port=False) == "bad_address"


def test_allowed_networks_admit_only_ip_literals_inside_them() -> None:
    nets = ("10.0.0.0/8", "fd00::/8")
    assert check_address("10.1.2.3:7000", allowed_networks=nets) is None
    assert check_address("[fd00::5]:7000", allowed_networks=nets) is None
    assert check_address("192.168.1.1:7000", allowed_networks=nets) == "network"
    assert check_address("[::1]:7000", allowed_networks=nets) == "network"
    # a hostname would need resolving to be checked: refused, never looked up
    assert check_address("yard.example:7000", allowed_networks=nets) == "network"
    assert check_address("bogus", allowed_networks=nets) == "bad_address"


def test_node_ids() -> None:
    assert check_node_id("truck-7") is None
    assert check_node_id("x" * MAX_NODE_ID_CHARS) is None
    for bad in ("", "x" * (MAX_NODE_ID_CHARS + 1), "a\nb", "\x00"):
        assert check_node_id(bad) == "bad_node_id"


def test_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="gossip_bytes"):
        GossipBounds(gossip_bytes=MAX_FRAME_BYTES)
    with pytest.raises(ValueError):
        GossipBounds(allowed_networks=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="dials_per_s"):
        GossipBounds(dials_per_s=0)
    with pytest.raises(ValueError, match="max_members"):
        GossipBounds(max_members=0)
    # every preset's own list fits the frame cap many times over
    for cfg in (MeshConfig.lan(), MeshConfig.metered_link(), MeshConfig.test()):
        assert cfg.gossip.gossip_bytes <= MAX_FRAME_BYTES // 2
    assert MeshConfig.lan().gossip.require_port
    assert MeshConfig.metered_link().gossip.dials_per_s < MeshConfig.lan().gossip.dials_per_s


# -- the member table (pure) ------------------------------------------------------------


def _ghosts(n: int, start: int = 0) -> list[PeerInfo]:
    return [
        PeerInfo(f"g{i}", f"10.9.{i // 250}.{i % 250}:7000", 1) for i in range(start, start + n)
    ]


def test_one_frame_adds_at_most_learn_per_frame_and_reads_at_most_read_per_frame() -> None:
    m = Membership("me", "10.0.0.1:7000", bounds=GossipBounds(learn_per_frame=5, read_per_frame=8))
    got = m.learn(_ghosts(20), now=0)
    assert [x.node_id for x in got.fresh] == ["g0", "g1", "g2", "g3", "g4"]
    assert got.refused == {"frame_cap": 15}  # 3 read past the new-member cap, 12 never read
    assert len(m.members) == 5


def test_invalid_entries_are_refused_with_their_reason_and_an_example() -> None:
    m = Membership("me", "10.0.0.1:7000", bounds=GossipBounds(allowed_networks=("10.0.0.0/8",)))
    got = m.learn(
        [
            PeerInfo("ok", "10.0.0.2:7000", 1),
            PeerInfo("x" * 4096, "10.0.0.3:7000", 1),
            PeerInfo("noport", "10.0.0.4", 1),
            PeerInfo("outside", "8.8.8.8:53", 1),
            PeerInfo("me", "10.0.0.5:7000", 9),  # claims to be this node: not held
            PeerInfo("dialer", "", 1),  # dials out only: nothing to hold
        ],
        now=0,
    )
    assert set(m.members) == {"10.0.0.2:7000"}
    assert got.refused == {"bad_node_id": 1, "bad_address": 1, "network": 1}
    assert got.examples["network"].address == "8.8.8.8:53"


def test_a_full_table_evicts_unreached_learned_members_the_dead_first_never_seeds() -> None:
    b = GossipBounds(max_members=4, learn_per_frame=64)
    m = Membership("me", "10.0.0.1:7000", ["10.0.0.9:7000"], suspect_after=1, bounds=b)
    m.learn(_ghosts(3), now=0)  # the seed + g0..g2: full
    m.succeeded("10.9.0.0:7000", "g0", now=1)  # g0 reached: kept from now on
    m.failed("10.9.0.1:7000", now=2)  # g1 tried and failed
    m.members["10.9.0.1:7000"].state = MemberState.DEAD
    got = m.learn(_ghosts(1, start=10), now=3)
    assert got.evicted == {"dead": 1} and got.evicted_ids == ["g1"]
    assert "10.9.0.1:7000" not in m.members
    got = m.learn(_ghosts(1, start=11), now=4)
    assert got.evicted == {"untried": 1}  # g2, the oldest never tried
    # what is left is the seed, the reached g0 and the newest untried one
    got = m.learn(_ghosts(5, start=20), now=5)
    assert len(m.members) == 4
    assert {"10.0.0.9:7000", "10.9.0.0:7000"} <= set(m.members)
    assert got.evicted == {"untried": 5}
    # a table of seeds and reached members refuses newcomers instead
    full = Membership("me", "A:1", ["S:1"], bounds=GossipBounds(max_members=2))
    full.succeeded("R:1", "r", now=0)
    got = full.learn(_ghosts(3), now=1)
    assert got.refused == {"table_full": 3} and set(full.members) == {"S:1", "R:1"}
    assert full.succeeded("Q:1", "q", now=2) is not None  # a dial's success obeys the cap too
    assert len(full.members) == 2


def test_own_list_is_capped_prefers_reached_members_and_rotates() -> None:
    b = GossipBounds(max_members=1024, learn_per_frame=1024, gossip_members=10)
    m = Membership("me", "10.0.0.1:7000", bounds=b)
    m.learn(_ghosts(100), now=0)
    reached = [f"10.9.0.{i}:7000" for i in (5, 6)]
    for a in reached:
        m.succeeded(a, None, now=1)
    seen: set[str] = set()
    for _ in range(13):  # 98 unreached members, 8 a list: 13 lists see them all
        lst = m.gossip()
        assert lst[0] == PeerInfo("me", "10.0.0.1:7000", 0)
        assert len(lst) == 11
        assert {p.address for p in lst[1:3]} == set(reached)  # reached members every time
        seen.update(p.address for p in lst)
    assert len(seen) == 101  # every alive member had its turn
    # the byte cap holds whatever the table: long ids and hostnames
    tight = Membership("me", "10.0.0.1:7000", bounds=b.with_(gossip_members=500, gossip_bytes=4096))
    host = ".".join(["h" * 60] * 4)  # a 243-character hostname
    tight.learn([PeerInfo(f"{i:0128d}", f"{host}:{i + 1}") for i in range(300)], now=0)
    assert len(encode_frame(Peers(tight.gossip()))) <= 4096


def test_a_choice_makes_at_most_new_dials_new_dials_and_fills_with_known_members() -> None:
    m = Membership("me", "10.0.0.1:7000", ["10.0.0.9:7000"], bounds=GossipBounds())
    m.learn(_ghosts(50), now=0)
    m.succeeded("10.9.0.7:7000", "g7", now=0)
    rng = random.Random(3)
    for budget in (0, 1):
        for _ in range(20):
            c = m.choose(3, rng, now=1, new_dials=budget)
            assert c.new == sum(1 for x in c.chosen if m.is_new(x)) <= budget
    c = m.choose(60, random.Random(1), now=1, new_dials=0)
    assert {x.address for x in c.chosen} == {"10.0.0.9:7000", "10.9.0.7:7000"}
    assert c.deferred == 49 and c.new == 0


# -- reporting (pure) ---------------------------------------------------------------------


def test_notices_are_rate_limited_per_key_and_count_what_they_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    n = Notices(logging.getLogger("syncfw.mesh"), 10.0, max_keys=2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="syncfw.mesh"):
        assert n.warn("a", 3, "first %s", clip("x" * 1000))
        assert not n.warn("a", 4, "again")
        assert n.warn("b", 1, "other key")
        assert n.warn("c", 1, "over max_keys: shares the overflow key")
        assert not n.warn("d", 1, "overflow again")
        now[0] = 10.0
        assert n.warn("a", 1, "later")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("first 'xxxx") and "(1000 chars)" in lines[0] and len(lines[0]) < 100
    assert lines[3] == "later [5 since the last such line]"


def test_guard_counts_and_logs_refusals_and_evictions(caplog: pytest.LogCaptureFixture) -> None:
    metrics = NodeMetrics("me")
    guard = GossipGuard("me", GossipBounds(max_members=2), metrics)
    m = Membership("me", "10.0.0.1:7000", bounds=GossipBounds(max_members=2))
    with caplog.at_level(logging.WARNING, logger="syncfw.mesh"):
        for start in range(0, 40, 4):
            got = m.learn([*_ghosts(3, start), PeerInfo("\x1b" * 5000, "10.0.0.3:1")], now=start)
            guard.learned(got, "10.6.6.6:7000", len(m.members))
    s = guard.status()
    assert s["members"] == 2
    assert s["refused"] == {"bad_node_id": 10}
    assert s["evicted"] == {"untried": 28}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # one per reason: the rest held back by the rate limit
    assert all(len(w) < 400 and "\x1b" not in w for w in warnings)


# -- the session hands over peer lists only after an accepted Hello --------------------------


def _hello(fleet: str = "default", node: str = "peer") -> Hello:
    return Hello(protocol=PROTOCOL_VERSION, fleet_id=fleet, node_id=node, max_batch_bytes=1 << 20)


def _learned_after(*frames: Hello | Peers) -> tuple[list[LearnPeers], Status | None]:
    s = Session("me", "default")
    s.start({})
    learned: list[LearnPeers] = []
    for f in frames:
        learned += [e for e in s.receive(f) if isinstance(e, LearnPeers)]
    return learned, s.status


def test_peers_are_learned_only_after_an_accepted_hello() -> None:
    lst = Peers(tuple(_ghosts(3)))
    assert _learned_after(lst) == ([], Status.INVALID_ARGUMENT)  # before any hello
    # a refused hello (another fleet) ends the session: nothing after it is learned
    assert _learned_after(_hello(fleet="other"), lst) == ([], Status.FAILED_PRECONDITION)
    assert _learned_after(_hello(node="me"), lst) == ([], Status.FAILED_PRECONDITION)
    # an accepted hello: the list is handed over
    assert _learned_after(_hello(), lst) == ([LearnPeers(lst.peers)], None)


# -- a hostile peer against a real mesh, in memory and over gRPC -----------------------------


def _invented(n: int, offset: int) -> list[PeerInfo]:
    """``n`` invented members near the cap of what is valid, behind a few invalid ones."""
    host = ".".join(["h" * 60] * 3) + ".x"  # a 185-character hostname
    bad = [
        PeerInfo(
            "\x1b[2Jghost", "10.0.0.8:7000", 1
        ),  # the wire caps lengths; this is a control char
        PeerInfo("no-port", "10.0.0.8", 1),
        PeerInfo("big-port", "10.0.0.8:99999", 1),
        PeerInfo("ctl", "\x1b[2J:7000", 1),
        PeerInfo("outside", "192.168.7.7:7000", 1),
    ]
    return bad + [
        PeerInfo(
            f"ghost-{i:0120d}",
            f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:7000" if i % 2 else f"{host}{i}:7000",
            1 << 60,
        )
        for i in range(offset, offset + n)
    ]


class _Recording:
    """A network that records every dial; only the honest peers are really dialed."""

    def __init__(self, inner: Network, honest: set[str]) -> None:
        self.inner = inner
        self.honest = honest
        self.dialed: list[str] = []

    async def serve(
        self, listen: str, handler: Handler, *, probe: ProbeHandler | None = None
    ) -> Listener:
        return await self.inner.serve(listen, handler, probe=probe)

    async def probe(
        self, address: str, *, source: str, target: str = "", timeout_s: float
    ) -> ProbeAnswer:
        self.dialed.append(address)
        if address not in self.honest:
            return ProbeAnswer(False, "", f"{address}: invented")
        return await self.inner.probe(address, source=source, target=target, timeout_s=timeout_s)

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        self.dialed.append(address)
        if address not in self.honest:
            raise LinkError(Status.UNAVAILABLE, f"{address}: invented")
        return await self.inner.connect(address, source=source, timeout_s=timeout_s)

    async def forget(self, address: str) -> None:
        await self.inner.forget(address)

    async def aclose(self) -> None:
        await self.inner.aclose()


Attack = Callable[[list[PeerInfo], list[tuple[PeerInfo, ...]]], Awaitable[ExchangeOutcome]]


@dataclass
class _Yard:
    victim: Mesh
    honest: Mesh
    victim_replica: MemoryReplica
    honest_replica: MemoryReplica
    net: _Recording
    attack: Attack


BOUNDS = GossipBounds(
    max_members=256,
    learn_per_frame=64,
    gossip_members=64,
    dials_per_s=0.001,
    dial_burst=4,
    allowed_networks=(),
    warn_every_s=60.0,
)


async def _yard(kind: str, stack: AsyncExitStack) -> _Yard:
    cfg = MeshConfig.test().with_(fanout=3, gossip=BOUNDS)
    honest_addr: set[str] = set()
    if kind == "memory":
        mem = MemoryNetwork()
        stack.push_async_callback(mem.aclose)

        def network() -> Network:
            return InMemoryNetwork(mem)

        listen = ("10.0.0.1:7000", "10.0.0.2:7000")
    else:

        def network() -> Network:
            return GrpcNetwork()

        listen = ("127.0.0.1:0", "127.0.0.1:0")
    hr, vr = MemoryReplica("honest"), MemoryReplica("victim")
    honest = await Mesh.start(hr, listen=listen[1], network=network(), config=cfg, run_loop=False)
    stack.push_async_callback(honest.aclose)
    honest_addr.add(honest.address)
    rec = _Recording(network(), honest_addr)
    victim = await Mesh.start(
        vr,
        listen=listen[0],
        seeds=[honest.address],
        network=rec,
        config=cfg,
        seed=1,
        run_loop=False,
    )
    stack.push_async_callback(victim.aclose)
    attacker_net = network()
    stack.push_async_callback(attacker_net.aclose)

    async def attack(peers: list[PeerInfo], got: list[tuple[PeerInfo, ...]]) -> ExchangeOutcome:
        stream = await attacker_net.connect(victim.address, source="", timeout_s=10)
        return await run_exchange(
            MemoryReplica("attacker"), stream, peers=peers, on_peers=got.append, timeout_s=10
        )

    return _Yard(victim, honest, vr, hr, rec, attack)


def _served(mesh: Mesh) -> int:
    return sum(mesh.outcomes.values())


async def _until_served(mesh: Mesh, n: int) -> None:
    await wait_until(lambda: _served(mesh) == n, what=f"{n} exchanges ended on {mesh.address}")


@pytest.mark.parametrize("kind", ["memory", "grpc"])
async def test_a_peer_gossiping_10k_invented_members(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="syncfw.mesh")
    async with AsyncExitStack() as stack:
        yard = await _yard(kind, stack)
        victim, honest = yard.victim, yard.honest
        frames: list[tuple[PeerInfo, ...]] = []
        big = 0
        for k in range(6):  # 10k members a frame, a different 10k each time
            invented = _invented(10_000, offset=k * 10_000)
            big = max(big, len(encode_frame(Peers(tuple(invented)))))
            out = await yard.attack(invented, frames)
            assert out.ok, out
            await _until_served(victim, k + 1)
        assert big > 2 * 1024 * 1024  # the attack frames are of the size that broke a node
        # the table stays within its cap; what came over it was refused or evicted
        assert len(victim.members()) <= BOUNDS.max_members
        st = victim.status()["gossip"]
        assert st["members"] == len(victim.members()) == BOUNDS.max_members
        assert st["refused"]["frame_cap"] > 0
        assert st["refused"]["bad_address"] == 6 * 3 and st["refused"]["bad_node_id"] == 6
        assert st["evicted"]["untried"] > 0
        assert honest.address in {m.address for m in victim.members()}  # the seed stays
        # the node's own Peers frame, as it went out to the attacker, stays small
        assert frames and all(len(f) <= BOUNDS.gossip_members + 1 for f in frames)
        own = max(len(encode_frame(Peers(f))) for f in frames)
        assert own <= BOUNDS.gossip_bytes < MAX_FRAME_BYTES
        # the node keeps syncing with the honest peer, both ways, rounds driven by hand
        yard.victim_replica.put("fleet/victim/k", "from victim")
        yard.honest_replica.put("fleet/honest/k", "from honest")
        oks = 0
        for _ in range(15):
            oks += sum(1 for o in await victim.round() if o.ok)
        assert oks >= 10  # the honest seed is in every round: new dials are rationed
        assert yard.victim_replica.get("fleet/honest/k") == "from honest"
        assert yard.honest_replica.get("fleet/victim/k") == "from victim"
        assert (await honest.sync_with(victim.address)).ok
        # the dial rate held: the burst and what ~1 ms/s refilled, no more
        new = [a for a in yard.net.dialed if a != honest.address]
        assert 1 <= len(new) <= BOUNDS.dial_burst + 1
        assert victim.status()["gossip"]["dials"]["deferred"] > 0
    # refusals were logged, few lines, peer text clipped
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    refused = [w for w in warnings if "refused gossiped members" in w]
    assert any("bad_address" in w for w in refused) and any("bad_node_id" in w for w in refused)
    assert len(warnings) <= 12 and all(len(w) < 600 for w in warnings)
    assert not any("\x1b" in r.getMessage() for r in caplog.records)


async def test_a_peers_frame_before_hello_teaches_nothing() -> None:
    mem = MemoryNetwork()
    victim = await Mesh.start(
        MemoryReplica("victim"),
        listen="10.0.0.1:7000",
        network=InMemoryNetwork(mem),
        config=MeshConfig.test().with_(gossip=BOUNDS),
        run_loop=False,
    )
    try:
        stream = await InMemoryNetwork(mem).connect("10.0.0.1:7000", source="", timeout_s=5)
        await stream.send(encode_frame(Peers(tuple(_ghosts(10)))))
        with contextlib.suppress(LinkError):  # the victim ends the call with its status
            while await stream.recv() is not None:
                pass
        await _until_served(victim, 1)
        assert victim.members() == [] and victim.outcomes == {"INVALID_ARGUMENT": 1}
    finally:
        await victim.aclose()
        await mem.aclose()


async def test_dial_rate_refills_with_time() -> None:
    now = [0.0]
    metrics = NodeMetrics("me")
    bounds = GossipBounds(dials_per_s=2.0, dial_burst=2)
    guard = GossipGuard("me", bounds, metrics, dials=TokenBucket(2.0, 2, clock=lambda: now[0]))
    m = Membership("me", "10.0.0.1:7000", bounds=bounds)
    m.learn(_ghosts(60), now=0)
    rng = random.Random(5)
    made = []
    for step in range(20):  # 20 rounds over 5 s of fake time
        now[0] = step * 0.25
        made.append(guard.choose(m, 3, rng, now[0]).new)
    assert sum(made) <= 2 + 2.0 * now[0]
    assert sum(made) >= 2 * now[0] - 1  # the rate is used, not starved
    assert metrics.value("syncfw_gossip_dials_total", outcome="new") == sum(made)
