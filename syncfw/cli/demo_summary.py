"""The demo's verified summary: every line is a check, and a failed check fails the demo.

:func:`verify` reads the replicas (and the JetStream stream) back after the story
and compares them with what the demo asked for (the :class:`~syncfw.cli.demo_acts.Ledger`)
and with what the rollout act did (:class:`~syncfw.cli.demo_rollout.RolloutOutcome`):

* all replicas identical: one state digest and one version vector on every node;
* no write lost: every node's own ops on every replica, the shared counters equal to
  the sum of their increments, every alert, every inference result with its label
  and model, and no inference call dropped;
* every result traceable to its model: each result names the factory model or a
  release whose signed manifest the cloud holds, with its version, and none names
  the release that was rolled back;
* the rollout: the good release committed on every edge, the bad one rolled back on
  its canaries with the gate's reason, halted on every node, never run elsewhere,
  and every edge serving the good one; its chunks came through peers;
* the dashboard's API lists every edge;
* the JetStream stream holds every op of the log exactly once, in per-origin order
  (or says why the export was skipped).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from syncfw.cli.demo_acts import Ledger, until
from syncfw.cli.demo_fleet import CLOUD, EDGES, EXPORT_STREAM, MODEL_NAME, DemoFleet
from syncfw.cli.demo_rollout import BAD, GOOD, RolloutOutcome
from syncfw.keys import results_prefix
from syncfw.models.lifecycle import read_records
from syncfw.models.rollout_ops import read_rollout

__all__ = ["Check", "Summary", "verify"]


@dataclass(frozen=True, slots=True)
class Check:
    """One verified line: what was checked, whether it held, and the figures."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False


@dataclass
class Summary:
    """Every check of a run; :attr:`ok` is what the demo's exit status says."""

    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, True, why, skipped=True))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def print(self) -> None:
        print("\nverified summary:")
        for c in self.checks:
            mark = "SKIP" if c.skipped else ("ok  " if c.ok else "FAIL")
            print(f"  [{mark}] {c.name}: {c.detail}")
        print("all checks passed" if self.ok else "SUMMARY FAILED: see the FAIL lines above")


async def verify(fleet: DemoFleet, ledger: Ledger, outcome: RolloutOutcome | None) -> Summary:
    """Run every check (see the module) on the fleet as it stands."""
    s = Summary()
    await _replicas(fleet, s)
    await _writes(fleet, ledger, s)
    await _traceable(fleet, outcome, s)
    if outcome is None:
        s.skip(
            "model rollout", "skipped: releases are signed by the authority key (not in --insecure)"
        )
    else:
        await _rollout(fleet, outcome, s)
    await _dashboard(fleet, s)
    await _stream(fleet, s)
    return s


async def _replicas(fleet: DemoFleet, s: Summary) -> None:
    nodes = fleet.all_nodes()
    digests = {n.node_id: await n.state_digest() for n in nodes}
    vvs = {n.node_id: await n.version_vector() for n in nodes}
    one = len(set(digests.values())) == 1 and all(v == vvs[CLOUD] for v in vvs.values())
    ops = sum(vvs[CLOUD].values())
    s.add(
        "all replicas identical",
        one,
        f"{len(nodes)} nodes, state {next(iter(digests.values()))[:16]}, {ops} ops"
        if one
        else f"digests { ({k: v[:12] for k, v in digests.items()}) }",
    )


async def _writes(fleet: DemoFleet, ledger: Ledger, s: Summary) -> None:
    cloud = fleet.cloud
    problems: list[str] = []
    for n in fleet.names:  # every node's own ops, as it counts them, on every replica
        own = (await fleet.nodes[n].version_vector()).get(n, 0)
        for other in fleet.all_nodes():
            if (await other.version_vector()).get(n, 0) < own:
                problems.append(f"{other.node_id} lacks ops of {n}")
    tonnes = await cloud.counter("site/ore-tonnes").value()
    parts = await cloud.counter("site/parts-inspected").value()
    alerts = set(await cloud.set("site/alerts").items())
    if tonnes != ledger.tonnes:
        problems.append(f"ore tonnes {tonnes} != {ledger.tonnes} added")
    if parts != ledger.parts:
        problems.append(f"parts inspected {parts} != {ledger.parts} counted")
    if alerts != ledger.alerts:
        problems.append(
            f"alerts: {len(ledger.alerts - alerts)} missing, "
            f"{len(alerts - ledger.alerts)} unexpected"
        )
    results = 0
    for n, written in ledger.results.items():
        held = await cloud.scan(results_prefix(n))
        for key, (label, sha) in written.items():
            v = held.get(key)
            if v is None or v.get("label") != label or v.get("model", {}).get("sha256") != sha:
                problems.append(f"result {key} missing or changed on the cloud")
            results += 1
    if ledger.failed_calls:
        problems.append(
            f"{len(ledger.failed_calls)} inference calls failed, e.g. {ledger.failed_calls[0]}"
        )
    s.add(
        "no write lost",
        not problems,
        "; ".join(problems[:5])
        if problems
        else f"every node's ops on every replica; ore tonnes {tonnes} = the sum of the "
        f"increments; {len(alerts)} alerts; all {results} decisions on the cloud with "
        f"their label and model; no inference call dropped",
    )


async def _traceable(fleet: DemoFleet, outcome: RolloutOutcome | None, s: Summary) -> None:
    from syncfw.inference.train import MODEL_PATH

    factory = hashlib.sha256(MODEL_PATH.read_bytes()).hexdigest()
    known: dict[str, str] = {factory: "1.0.0"}
    if CLOUD in fleet.artifacts:
        judged = (await fleet.artifacts[CLOUD].releases()).get(MODEL_NAME)
        for m in judged.accepted if judged is not None else ():
            known[m.sha256] = str(m.version)
    bad = outcome.sha256.get(BAD) if outcome is not None else None
    by_version: dict[str, int] = {}
    untraced: list[str] = []
    for n in EDGES:
        for key, v in (await fleet.cloud.scan(results_prefix(n))).items():
            m = v.get("model", {}) if isinstance(v, dict) else {}
            sha, version = m.get("sha256"), m.get("version")
            if m.get("name") != MODEL_NAME or known.get(sha) != version or sha == bad:
                untraced.append(key)
                continue
            by_version[version] = by_version.get(version, 0) + 1
    s.add(
        "every result traceable to its model",
        not untraced and bool(by_version),
        f"{len(untraced)} results name no known model, e.g. {untraced[:2]}"
        if untraced
        else ", ".join(f"{k} by {MODEL_NAME} {ver}" for ver, k in sorted(by_version.items()))
        + " (the factory image, or a release the cloud signed); none by the rolled-back "
        f"v{BAD}",
    )


async def _rollout(fleet: DemoFleet, o: RolloutOutcome, s: Summary) -> None:
    recs = await read_records(fleet.cloud, MODEL_NAME)
    good = await read_rollout(fleet.cloud, MODEL_NAME, GOOD)
    committed = [n for n in EDGES if n in recs and recs[n].serving_version == GOOD]
    serving = [
        n for n in EDGES if (m := fleet.engines[n].model) is not None and m.sha256 == o.sha256[GOOD]
    ]
    ok_good = good is not None and good.done and committed == list(EDGES) == serving
    s.add(
        f"release v{GOOD} reached the whole fleet",
        ok_good,
        f"committed and serving on {len(serving)}/{len(EDGES)} edges, rollout done"
        if ok_good
        else f"committed on {committed}, serving on {serving}",
    )
    from_peers = sum(b for n in EDGES for src, b in o.by_peer.get(n, {}).items() if src != CLOUD)
    fetched = sum(sum(o.by_peer.get(n, {}).values()) for n in EDGES)
    s.add(
        f"v{GOOD}'s chunks shared peer to peer",
        from_peers > 0,
        f"{from_peers} of {fetched} bytes the edges fetched came from peers; the cloud "
        f"uploaded {sum(o.cloud_bytes_out.values())} bytes ({o.size} per copy) for "
        f"{len(EDGES) + 1} nodes",
    )
    rolled = [
        n
        for n in o.canaries
        if n in recs
        and recs[n].version == BAD
        and recs[n].step == "rolled_back"
        and "accuracy" in recs[n].reason
    ]
    ran = [n for n in EDGES if n not in o.canaries and n in recs and recs[n].version >= BAD]
    halted = []
    for n in fleet.names:
        r = await read_rollout(fleet.nodes[n], MODEL_NAME, BAD)
        if r is not None and r.halted:
            halted.append(n)
    ok_bad = bool(rolled) and not ran and len(halted) == len(fleet.names) and bool(serving)
    reason = recs[rolled[0]].reason if rolled else ""
    s.add(
        f"release v{BAD} caught, rolled back and halted",
        ok_bad,
        f"rolled back on canaries {', '.join(rolled)} ({reason[:80]}); halted on all "
        f"{len(halted)} nodes; run by no other node; every edge still serves v{GOOD}"
        if ok_bad
        else f"rolled back on {rolled}, run elsewhere by {ran}, halted on {halted}",
    )


async def _dashboard(fleet: DemoFleet, s: Summary) -> None:
    dash = fleet.dashboard
    if dash is None:
        s.skip("dashboard", "skipped: the cloud extra is not installed")
        return

    def get() -> Any:
        with urllib.request.urlopen(f"{dash.url}api/v1/fleet", timeout=10) as r:
            return json.load(r)

    view = await asyncio.to_thread(get)
    nodes = set(view.get("nodes", {}))
    want = set(fleet.names) - {CLOUD}
    s.add(
        "the dashboard shows the fleet",
        want <= nodes,
        f"{dash.url}api/v1/fleet lists {len(nodes)} nodes"
        + ("" if want <= nodes else f", missing {sorted(want - nodes)}"),
    )


async def _stream(fleet: DemoFleet, s: Summary) -> None:
    exporter = fleet.exporter
    name = "the JetStream stream complete"
    if exporter is None:
        s.skip(name, fleet.nats_note or "skipped")
        return
    from syncfw.cloud.export_check import check_stream, read_stream

    vv = await fleet.cloud.version_vector()

    async def exported() -> bool:
        return all(exporter.cursor.get(o, 0) >= n for o, n in vv.items())

    try:
        await until(exported, 60, every_s=0.1)
    except TimeoutError:
        s.add(name, False, f"the exporter did not catch up: {exporter.status()['last_error']}")
        return
    ops = await read_stream(fleet.nats.urls, EXPORT_STREAM)
    report = check_stream(ops, vv)
    s.add(name, report.ok, f"stream {EXPORT_STREAM}: {report} ({sum(vv.values())} ops in the log)")
