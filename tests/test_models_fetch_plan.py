"""The fetch's planning on a yard's adverts: a chunk no peer holds leaves the seed about
once (its rendezvous fetcher asks for it, the others hold back), a chunk a peer holds is
asked of the peer, a truck that finished is a peer and not a seed, and a chunk held back
too long is asked of the seed by anyone. Pure planning over real manifests and chunk
stores; no transfer."""

from __future__ import annotations

import random
import time
from pathlib import Path

from syncfw.models.adverts import Advert, bitmap
from syncfw.models.chunks import ChunkStore
from syncfw.models.fetch import FetchConfig, Fetcher, Source, _Run, busy_reason, busy_takers
from syncfw.models.manifest import MIN_CHUNK_BYTES, build_manifest

N = 24
TRUCKS = [f"t{i:02d}" for i in range(8)]


def run_for(tmp: Path, me: str, **cfg: float) -> _Run:
    data = random.Random(1).randbytes(N * MIN_CHUNK_BYTES)  # the same release for all
    m = build_manifest(data, name="inspection", version=1, chunk_size=MIN_CHUNK_BYTES)
    store = ChunkStore(tmp / me, durable=False)
    f = Fetcher(
        store,
        None,  # type: ignore[arg-type]  # planning only: nothing is sent
        node_id=me,
        sources=None,  # type: ignore[arg-type]
        config=FetchConfig(**cfg),  # type: ignore[arg-type]
    )
    return _Run(f, m, None)


def src(node: str, held: range | None, sha: str) -> Source:
    have = b"" if held is None else bitmap(held, N) or bytes((N + 7) // 8)
    return Source(node, node, Advert(node, sha, N, have))


def test_each_chunk_no_peer_holds_is_asked_of_the_seed_by_one_fetcher(tmp_path: Path) -> None:
    asked: dict[int, list[str]] = {}
    for me in TRUCKS:
        r = run_for(tmp_path, me, parallel=64)
        sha = r.m.sha256
        sources = [src("depot", None, sha)] + [src(t, range(0), sha) for t in TRUCKS if t != me]
        plan = r._plan(sources, 64)
        assert {s.node_id for s, _ in plan} <= {"depot"}
        for _, idx in plan:
            assert len(idx) == 1  # one chunk at a time from the seed while others fetch
            for i in idx:
                asked.setdefault(i, []).append(me)
    # over the yard, no chunk is asked of the seed twice (the fan-out limit is one)
    assert all(len(who) == 1 for who in asked.values()), asked


def test_a_chunk_a_peer_holds_is_asked_of_the_peer_and_a_finished_truck_is_a_peer(
    tmp_path: Path,
) -> None:
    r = run_for(tmp_path, "t00", parallel=8, batch=4)
    sha = r.m.sha256
    # t01 was seen fetching, then finished: complete, but a peer on the LAN
    r._plan([src("depot", None, sha), src("t01", range(4), sha)], 8)
    plan = r._plan([src("depot", None, sha), src("t01", None, sha)], 8)
    to = {s.node_id: idx for s, idx in plan}
    assert "t01" in to and len(to["t01"]) == 4  # batches, per_source requests
    assert "depot" not in to  # every chunk has a peer holder: the seed is not asked


def test_a_chunk_held_back_too_long_is_asked_of_the_seed_by_anyone(tmp_path: Path) -> None:
    r = run_for(tmp_path, "t00", parallel=64, seed_hold_s=0.0)
    sha = r.m.sha256
    sources = [src("depot", None, sha)] + [src(t, range(0), sha) for t in TRUCKS[1:]]
    plan = r._plan(sources, 64)
    assert [s.node_id for s, _ in plan] == ["depot"]  # one chunk: the seed's limit
    r2 = run_for(tmp_path, "t00", parallel=64, seed_hold_s=60.0, stall_s=200.0)
    sources = [src("depot", None, r2.m.sha256)] + [
        src(t, range(0), r2.m.sha256) for t in TRUCKS[1:]
    ]
    mine = r2._plan(sources, 64)
    # the chunks the rendezvous gives this truck, and none it holds back for the others
    assert len(mine) <= 1


def test_a_busy_seed_names_its_takers_and_they_are_asked_before_they_advertise(
    tmp_path: Path,
) -> None:
    r = run_for(tmp_path, "t00", parallel=8, batch=4)
    sha = r.m.sha256
    r.f.locate = lambda node: node if node in TRUCKS else None
    named = busy_takers(
        "busy: chunk 0a1b just went to 2 peers; take it from them "
        + busy_reason(["t05", "t03", "not an id", "t00"])
    )
    assert named == ["t00", "t03", "t05"]  # sorted; a malformed id is dropped
    takers = [t for t in named if t != "t00"]  # the fetcher never asks itself
    # what the fetcher does with a busy answer for chunk 7 (see Fetcher._request)
    depot = src("depot", None, sha)
    r._defer(depot, [7])
    r.refused_busy.add(("depot", 7))
    r.hints[7] = set(takers)
    r.fetching.update(takers)
    plan = r._plan([depot], 8)  # no advert of t03 or t05 has arrived yet
    to = {s.node_id: idx for s, idx in plan}
    assert any(7 in to.get(t, []) for t in takers), to  # a taker is asked for chunk 7
    assert 7 not in to.get("depot", [])  # and the seed is not, while it defers it
    # every other chunk no peer holds: the seed, one at a time
    assert len(to.get("depot", [])) <= 1


def test_a_deferral_doubles_and_ends(tmp_path: Path) -> None:
    r = run_for(tmp_path, "t00", busy_s=0.1, seed_hold_s=0.3)
    depot = src("depot", None, r.m.sha256)
    waits = []
    for _ in range(4):
        r._defer(depot, [2])
        waits.append(r.deferred[("depot", 2)] - time.monotonic())
    assert 0.05 < waits[0] <= 0.1 < waits[1] <= 0.2 < waits[2] <= 0.3
    assert waits[3] <= 0.3  # at most seed_hold_s
    r.deferred[("depot", 2)] = time.monotonic() - 1  # over: the seed is asked again
    plan = r._plan([depot], 4)
    assert 2 in [i for _, idx in plan for i in idx] or len(plan) == 1
