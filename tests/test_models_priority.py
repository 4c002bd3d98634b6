"""State and alerts before chunks: while a truck fills the depot's metered uplink with model
chunks, an alert the depot writes still reaches it at once (the shared bandwidth budget
serves sync frames ahead of chunk pieces). Real nodes on the in-memory network."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from syncfw.models import ArtifactConfig, FetchConfig
from syncfw.testing import wait_until
from syncfw.transport.budget import Priority
from tests.test_models_artifacts import CHUNK, Yard, blob

RATE = 400_000.0  # bytes/s: the depot's uplink, the scarce resource


async def test_an_alert_overtakes_the_chunks_filling_a_metered_link(tmp_path: Path) -> None:
    yard = Yard(tmp_path)
    try:
        await yard.add("depot", rate=RATE)
        await yard.add("t0", config=ArtifactConfig(durable=False, fetch=FetchConfig(
            piece_timeout_s=20.0, stall_s=30.0, retry_s=0.02)))
        await yard.meet()
        data = blob(64 * CHUNK)  # 1 MiB: about 2.6 s of the depot's uplink
        m = await yard.publish(data)
        await yard.learn("t0")
        truck = yard.arts["t0"]
        progress: list[int] = []
        fetch = asyncio.create_task(truck.fetch(m, lambda p: progress.append(p.held)))
        t0 = time.monotonic()
        await wait_until(lambda: len(progress) > 3 and progress[-1] >= 4,
                         what="the fetch is under way", timeout_s=30)
        budget = yard.arts["depot"].mesh.serve_budget  # type: ignore[union-attr]
        assert budget is not None
        bulk_before = budget.spent_by[Priority.BULK]
        # the alert: a state write on the depot, while its uplink is full of chunks
        sent = time.monotonic()
        await yard.nodes["depot"].put("fleet/depot/alerts/door", {"open": True})

        async def arrived() -> bool:
            return await yard.nodes["t0"].get("fleet/depot/alerts/door") is not None

        await wait_until(arrived, what="the alert reaches the truck", timeout_s=30,
                         interval_s=0.005)
        alert_s = time.monotonic() - sent
        held_then = truck.fetches[f"{m.name}:{m.version}"].held
        got = await asyncio.wait_for(fetch, 60)
        fetch_s = time.monotonic() - t0
        assert got.done and await truck.read(m) == data
        # the chunks really were throttled by the budget (the link was full) ...
        assert fetch_s >= 0.6 * len(data) / RATE, fetch_s
        assert budget.spent_by[Priority.BULK] > bulk_before
        # ... and the alert did not queue behind them: it came while most chunks were
        # still to come, in a small part of the time the whole transfer took
        assert held_then < len(m.chunks), (held_then, len(m.chunks))
        assert alert_s < 0.25 * fetch_s, (alert_s, fetch_s)
    finally:
        await yard.close()
