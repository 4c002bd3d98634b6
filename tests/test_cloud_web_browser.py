"""The dashboard's page in real headless Chromium (Debian's ``chromium``, driven by Playwright;
no browser is downloaded): a small real fleet on loopback gRPC feeds an aggregator, its data
appears on the page, and when one node is cut off (its egress proxy refuses the others) its lag
cell turns red on the page without a reload, as screenshots show; healed, it clears again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_cloud_web_kit import WebFleet, results, web_fleet

from syncfw.clock import wall_ms
from syncfw.keys import mode_key
from syncfw.mesh.models import ModelStatus, publish_model
from syncfw.testing import wait_until

CHROMIUM = os.environ.get("SYNCFW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (Debian's chromium package; .ci/run installs it)",
                allow_module_level=True)
async_api = pytest.importorskip("playwright.async_api",
                                reason="playwright (the dev extra) is not installed")

RED = (0xD9, 0x30, 0x25)  # td.lag-bad in dashboard.css
LINE_COLORS = {(0x1A, 0x73, 0xE8), (0x18, 0x80, 0x38), (0x93, 0x34, 0xE6)}  # first of the palette


# -- reading a screenshot ------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """``(width, height, RGB pixels)`` of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
            channels = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        pixels += [tuple(line[x:x + 3]) for x in range(0, stride, channels)]  # type: ignore[misc]
        prev = line
    return width, height, pixels


def share(png: bytes, colors: set[tuple[int, int, int]], tol: int = 24) -> float:
    """The share of the image's pixels within ``tol`` of one of ``colors``."""
    _, _, px = png_pixels(png)
    near = sum(1 for p in px if any(max(abs(p[i] - c[i]) for i in range(3)) <= tol
                                    for c in colors))
    return near / len(px)


def test_the_png_reader_reads_what_zlib_wrote() -> None:
    # a 2x2 RGB image, rows filtered "none" and "up", as a real encoder may write them
    rows = b"\x00" + bytes([255, 0, 0, 0, 255, 0]) + b"\x02" + bytes([0, 0, 255, 0, 0, 0])
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(
        b"IEND", b"")
    assert png_pixels(png) == (2, 2, [(255, 0, 0), (0, 255, 0), (255, 0, 255), (0, 255, 0)])
    assert share(png, {(255, 0, 0)}) == 0.25


# -- the page ------------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with async_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # the system's chromium, not a browser of Playwright's own
            proc = await asyncio.create_subprocess_exec(
                CHROMIUM, "--version", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
            assert b.version in out.decode(), (b.version, out)
            yield b
        finally:
            await b.close()


def _cell(node: str, field: str) -> str:
    return f'#fleet tr[data-node="{node}"] td[data-field="{field}"]'


async def _text(page: Any, node: str, field: str) -> str:
    return str(await page.locator(_cell(node, field)).inner_text())


async def _keep_writing(f: WebFleet) -> None:
    i = 1000
    while True:
        await results(f.edges["t1"], [40.0 + (i % 7)], start=i)
        i += 1
        await asyncio.sleep(0.2)


async def test_the_page_shows_the_fleet_live_and_a_cut_node_turns_red(
    browser: Any, tmp_path: Path
) -> None:
    # The kit's mesh tolerates a browser starting on two shared cores; a cut node's lag cell
    # turns red by the lag itself (LAG_WARN_S) whatever its member state says.
    async with web_fleet(tmp_path) as f:
        t1, t2 = f.edges["t1"], f.edges["t2"]
        await publish_model(t1, "t1", ModelStatus("det", "2", "ab" * 32, "active"))
        await publish_model(t2, "t2", ModelStatus("det", "3", "cd" * 32, "canary"))
        await t2.put(mode_key("t2"), {"mode": "degraded", "previous": "full", "reason": "hot",
                                      "at_ms": wall_ms()})
        await results(t1, [float(i) for i in range(1, 101)])
        await results(t2, [float(i) for i in range(200, 210)])

        def healthy() -> bool:
            n = f.agg.view()["nodes"]
            return (n.get("t1", {}).get("inferences") == 100 and n.get("t2", {}).get("mode")
                    == "degraded" and all(n.get(x, {}).get("sync_lag_ops") == 0
                                          and n[x]["state"] == "alive" for x in ("t1", "t2")))

        await wait_until(healthy, what="both edges alive and caught up", timeout_s=30)
        page = await browser.new_page(viewport={"width": 1500, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        await page.goto(f.dash.url)
        await page.wait_for_function(
            "() => document.querySelector('#live').textContent === 'live'", timeout=15_000)
        await page.evaluate("() => { window.__notReloaded = 42; }")

        # real data from the fleet, in the table and the totals
        await page.wait_for_function(
            "() => { const c = document.querySelector("
            "'#fleet tr[data-node=\"t1\"] td[data-field=\"inferences\"]');"
            " return c && c.textContent === '100'; }", timeout=15_000)
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#fleet td[data-field=\"state\"]')]"
            ".filter((c) => c.textContent === 'alive').length >= 2", timeout=15_000)
        assert await _text(page, "t1", "model") == "det v2"
        assert await _text(page, "t1", "stage") == "active"
        assert await _text(page, "t1", "latency") == "50.0 / 99.0"
        assert await _text(page, "t2", "model") == "det v3"
        assert await _text(page, "t2", "stage") == "canary"
        assert await _text(page, "t2", "mode") == "degraded (hot)"
        assert await _text(page, "t2", "lag_ops") == "0"
        assert await page.locator("#t-degraded").inner_text() == "t2"
        assert "det v3 canary: 1" in await page.locator("#t-rollout").inner_text()
        assert await page.locator("#t-forked").inner_text() == "none"
        # the charts drew lines from the samples
        await page.wait_for_function(
            "() => document.querySelectorAll('#chart-latency polyline').length >= 2",
            timeout=15_000)
        await page.wait_for_timeout(600)  # the chart redraws at most every 250 ms
        chart = await page.locator("#chart-latency").screenshot()
        assert share(chart, LINE_COLORS) > 0.002, "no chart line in the latency chart"
        shot = await page.screenshot(full_page=True)
        (tmp_path / "healthy.png").write_bytes(shot)
        before = await page.locator(_cell("t2", "lag_s")).screenshot()
        assert share(before, {RED}) < 0.05, "t2's lag cell is red while it is in sync"

        # cut t2 off; t1 keeps writing, so the aggregator holds ops t2 lacks
        events_before = int(await page.evaluate("() => document.body.dataset.events"))
        writer = asyncio.create_task(_keep_writing(f))
        try:
            f.partition.split(["t2"], ["cloud", "t1"])
            await page.wait_for_function(
                "() => { const c = document.querySelector("
                "'#fleet tr[data-node=\"t2\"] td[data-field=\"lag_s\"]');"
                " return c && c.classList.contains('lag-bad') && Number(c.textContent) >= 5; }",
                timeout=45_000)
            lag_ops = int(await _text(page, "t2", "lag_ops"))
            assert lag_ops > 0
            after = await page.locator(_cell("t2", "lag_s")).screenshot()
            assert share(after, {RED}) > 0.5, "t2's lag cell is not red on the page"
            t1_cell = await page.locator(_cell("t1", "lag_s")).screenshot()
            assert share(t1_cell, {RED}) < 0.05, "the connected node's cell turned red too"
            (tmp_path / "partitioned.png").write_bytes(await page.screenshot(full_page=True))
            # it came over the event stream: the same page, more events
            assert await page.evaluate("() => window.__notReloaded") == 42
            assert int(await page.evaluate("() => document.body.dataset.events")) > events_before

            # healed: t2 catches up and its cell clears, still without a reload
            f.partition.heal()
            await page.wait_for_function(
                "() => { const c = document.querySelector("
                "'#fleet tr[data-node=\"t2\"] td[data-field=\"lag_s\"]');"
                " return c && !c.classList.contains('lag-bad'); }", timeout=45_000)
            healed = await page.locator(_cell("t2", "lag_s")).screenshot()
            assert share(healed, {RED}) < 0.05
            assert await page.evaluate("() => window.__notReloaded") == 42
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            # before the dashboard stops: its EventSource would reconnect into the shutdown
            await page.close()
        assert not errors, errors
