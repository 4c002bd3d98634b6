"""The dashboard's JSON API on its own, over real HTTP against a real aggregator and edges on
loopback gRPC: what each route answers, malformed requests refused with clear 4xx JSON (bad
paths, bad query values, huge heads, wrong methods) and counted, the event stream's snapshot,
deltas and samples, its bound, and ``syncfw cloud run --http`` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from test_cloud_web_kit import EventReader, WebFleet, http, results, web_fleet

from syncfw.cloud.web import DashboardConfig, parse_listen
from syncfw.cloud.web_api import STATES
from syncfw.cloud.web_history import History
from syncfw.testing import wait_until


@pytest.fixture
async def wf(tmp_path: Path) -> WebFleet:
    async with web_fleet(tmp_path) as f:
        await results(f.edges["t1"], [float(i) for i in range(1, 101)])
        await f.edges["t2"].put("fleet/t2/hello", 1)

        def shown() -> bool:
            n = f.agg.view()["nodes"]
            return (n.get("t1", {}).get("inferences") == 100 and "t2" in n
                    and all(n[x]["state"] == "alive" and n[x]["sync_lag_ops"] is not None
                            for x in ("t1", "t2")))

        await wait_until(shown, what="the view shows both edges", timeout_s=20)
        yield f


async def test_the_routes_answer_the_fleet_view(wf: WebFleet) -> None:
    a = wf.address
    index = (await http(a, "/api/v1")).json()
    assert index["api_version"] == 1 and index["aggregator"] == "cloud"
    assert "/api/v1/events" in index["routes"]

    fleet = await http(a, "/api/v1/fleet")
    assert fleet.status == 200 and fleet.headers["cache-control"] == "no-store"
    view = fleet.json()
    assert view["version"] == 1 and view["api_version"] == 1 and view["aggregator"] == "cloud"
    t1 = view["nodes"]["t1"]
    assert t1["inferences"] == 100 and t1["latency_ms"]["p50_ms"] == 50.0
    assert t1["latency_ms"]["p99_ms"] == 99.0 and t1["state"] in STATES
    assert t1["sync_lag_ops"] is not None
    # the same document as the aggregator's own
    assert set(view["nodes"]) == set(wf.agg.view()["nodes"])

    only = (await http(a, "/api/v1/fleet?prefix=t2")).json()
    assert list(only["nodes"]) == ["t2"]
    alive = (await http(a, "/api/v1/fleet?state=alive&state=suspect")).json()
    assert {"t1", "t2"} <= set(alive["nodes"])
    dead = (await http(a, "/api/v1/fleet?state=dead")).json()
    assert dead["nodes"] == {} and dead["totals"]["nodes"] == view["totals"]["nodes"]

    node = (await http(a, "/api/v1/nodes/t1")).json()
    assert node["node_id"] == "t1" and node["inferences"] == 100

    await wait_until(lambda: len(wf.dash.history.points_of("t1")) >= 3, what="three samples")
    hist = (await http(a, "/api/v1/nodes/t1/history?points=2")).json()
    assert hist["node_id"] == "t1" and len(hist["points"]) == 2
    p = hist["points"][-1]
    assert p["p99_ms"] == 99.0 and p["inferences"] == 100 and p["state"] == "alive"
    assert hist["points"][0]["t_ms"] < p["t_ms"]

    page = await http(a, "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"/static/dashboard.js" in page.body
    js = await http(a, "/static/dashboard.js")
    css = await http(a, "/static/dashboard.css")
    assert js.status == css.status == 200 and b"EventSource" in js.body
    for asset in (page.body, js.body, css.body):  # nothing is fetched from elsewhere
        rest = asset.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"http://" not in rest and b"https://" not in rest and b"//cdn" not in rest
    head = await http(a, "/api/v1/fleet", method="HEAD")
    assert head.status == 200 and head.body == b""
    head = await http(a, "/api/v1/events", method="HEAD")  # answered, not held open
    assert head.status == 200 and head.headers["content-type"].startswith("text/event-stream")
    assert wf.dash.streams == 0


BAD = [
    # (method, target, extra headers, status, error code)
    ("GET", "/nope", {}, 404, "not_found"),
    ("GET", "/api/v2/fleet", {}, 404, "not_found"),
    ("GET", "/api/v1/nodes/a%2Fb", {}, 404, "not_found"),
    ("GET", "/api/v1/nodes/zz", {}, 404, "unknown_node"),
    ("GET", "/api/v1/nodes/zz/history", {}, 404, "unknown_node"),
    ("GET", "/api/v1/nodes/%2A", {}, 400, "bad_node_id"),
    ("GET", "/api/v1/nodes/.hidden", {}, 400, "bad_node_id"),
    ("GET", "/api/v1/nodes/" + "x" * 300, {}, 400, "bad_node_id"),
    ("GET", "/api/v1/nodes/%C3%28", {}, 400, "bad_node_id"),
    ("GET", "/static/../web.py", {}, 404, "not_found"),
    ("GET", "/static/secret.py", {}, 404, "not_found"),
    ("GET", "/api/v1/fleet?limit=3", {}, 400, "bad_query"),
    ("GET", "/api/v1/fleet?state=sleepy", {}, 400, "bad_query"),
    ("GET", "/api/v1/fleet?prefix=a&prefix=b", {}, 400, "bad_query"),
    ("GET", "/api/v1/fleet?prefix=" + "p" * 300, {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1?verbose=1", {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1/history?points=abc", {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1/history?points=0", {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1/history?points=-1", {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1/history?points=1.5", {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1/history?points=99999999999999", {}, 400, "bad_query"),
    ("GET", "/api/v1/nodes/t1/history?points=%EF%BC%95", {}, 400, "bad_query"),  # fullwidth 5
    ("GET", "/api/v1/events?since=0", {}, 400, "bad_query"),
    ("POST", "/api/v1/fleet", {}, 405, "method_not_allowed"),
    ("DELETE", "/api/v1/nodes/t1", {}, 405, "method_not_allowed"),
    ("PUT", "/", {}, 405, "method_not_allowed"),
    ("PATCH", "/api/v1/events", {}, 405, "method_not_allowed"),
    ("GET", "/api/v1/fleet", {"X-Big": "h" * 20_000}, 431, "headers_too_large"),
    ("GET", "/api/v1/fleet", {f"X-H{i}": "v" * 90 for i in range(200)}, 431, "headers_too_large"),
    ("GET", "/api/v1/fleet?prefix=t&" + "&".join(["state=alive"] * 300), {}, 414,
     "target_too_large"),
]


async def test_malformed_requests_get_clear_4xx_json_errors(wf: WebFleet) -> None:
    a = wf.address
    before = dict(wf.dash.answers)
    for method, target, headers, status, code in BAD:
        reply = await http(a, target, method=method, headers=headers)
        assert reply.status == status, (method, target[:60], reply.status, reply.body[:200])
        err = reply.json()
        assert err["error"] == code and err["status"] == status, (target[:60], err)
        assert isinstance(err["message"], str) and 0 < len(err["message"]) < 400, err
        if status == 405:
            assert reply.headers["allow"] == "GET, HEAD", reply.headers
    # a body on a GET is ignored, not trusted; the answer is still the view
    assert (await http(a, "/api/v1/fleet", body=b"x" * 5000)).status == 200
    # a head past what the HTTP parser holds is refused by it (4xx), and nothing else breaks
    try:
        huge = await http(a, "/api/v1/fleet", headers={"X-Huge": "h" * 1_000_000})
        assert 400 <= huge.status < 500
    except ConnectionResetError:
        pass  # it answered 400 and closed with the rest of our head unread: a reset here
    junk = await http(a, "", raw_head=b"\x16\x03\x01 not http at all\r\n\r\n")
    assert 400 <= junk.status < 500
    ok = await http(a, "/api/v1/fleet")
    assert ok.status == 200 and "t1" in ok.json()["nodes"]
    # every refusal counted: in the status and in /metrics
    refused = {k: wf.dash.answers.get(k, 0) - before.get(k, 0) for k in (400, 404, 405, 414, 431)}
    assert refused == {
        s: sum(1 for b in BAD if b[3] == s) for s in (400, 404, 405, 414, 431)
    }, refused
    st = (await wf.agg.node.status())["dashboard"]
    assert st["refused"] >= len(BAD)
    text = wf.agg.node.metrics.exposition().decode()
    assert 'syncfw_dashboard_requests_total{code="431",node="cloud",route="unmatched"} 2.0' in text
    assert 'syncfw_dashboard_requests_total{code="400",node="cloud",route="history"}' in text


async def test_the_event_stream_sends_a_snapshot_then_deltas_and_samples(wf: WebFleet) -> None:
    await wait_until(lambda: wf.dash.history.has("t1"), what="t1 sampled")
    async with EventReader(wf.address) as ev:
        assert ev.status == 200
        assert ev.headers["content-type"].startswith("text/event-stream")
        snap = await ev.until("snapshot")
        assert snap["api_version"] == 1 and snap["view"]["nodes"]["t1"]["inferences"] == 100
        assert "t1" in snap["history"]
        await results(wf.edges["t1"], [500.0] * 10, start=100)

        async def delta_shows_110() -> bool:
            d = await ev.until("delta")
            return d["nodes"].get("t1", {}).get("inferences") == 110

        async with asyncio.timeout(20):
            while not await delta_shows_110():
                pass
        sample = await ev.until("sample")
        assert sample["t_ms"] > 0 and "t1" in sample["points"]
        assert wf.dash.streams == 1


async def test_event_streams_are_bounded_and_end_when_the_dashboard_closes(
    wf: WebFleet,
) -> None:
    cap = wf.dash.config.max_streams
    readers = [EventReader(wf.address) for _ in range(cap)]
    for r in readers:
        await r.__aenter__()
        await r.until("snapshot")
    assert wf.dash.streams == cap
    async with EventReader(wf.address) as extra:
        assert extra.status == 503 and extra.headers["retry-after"] == "5"
        assert json.loads(extra.body)["error"] == "too_many_streams"
    await readers[0].__aexit__()
    await wait_until(lambda: wf.dash.streams == cap - 1, what="a closed stream is let go")
    async with EventReader(wf.address) as again:
        assert again.status == 200
        await again.until("snapshot")
        # closing the dashboard ends the open streams, promptly
        async with asyncio.timeout(5):
            await asyncio.gather(wf.dash.aclose(), _ended(again), *(_ended(r) for r in readers[1:]))
    assert wf.dash.streams == 0
    for r in readers[1:]:
        await r.__aexit__()


async def _ended(reader: EventReader) -> None:
    """Read until the stream ends (a keepalive or a sample may come first)."""
    try:
        while True:
            await reader.next(5)
    except (EOFError, asyncio.IncompleteReadError, ConnectionError):
        return


def test_history_is_bounded_and_listen_addresses_parse() -> None:
    h = History(points=3, max_nodes=2)
    for t in range(5):
        h.record({"nodes": {n: {"state": "alive", "sync_lag_ops": t} for n in ("a", "b", "c")}},
                 t)
    assert h.nodes() == ["a", "b"] and h.untracked == {"c"}
    assert [p["lag_ops"] for p in h.points_of("a")] == [2, 3, 4]
    assert h.points_of("a", 1)[0]["t_ms"] == 4 and h.points_of("zz") == []
    with pytest.raises(ValueError):
        History(points=0)
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert DashboardConfig.test().max_streams < DashboardConfig().max_streams


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def _cloud_run(tmp: Path, *extra: str, env: dict[str, str] = ENV) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncfw", "cloud", "run", "--db", str(tmp / "cloud.db"),
        "--listen", "127.0.0.1:0", "--preset", "test", *extra, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_cloud_run_http_serves_the_dashboard(tmp_path: Path) -> None:
    proc = await _cloud_run(tmp_path, "--http", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        url = ""
        async with asyncio.timeout(30):
            while not url:
                line = (await proc.stdout.readline()).decode()
                assert line, "cloud run ended before printing the dashboard"
                if line.startswith("dashboard "):
                    url = line.split()[1]
        address = url.removeprefix("http://").rstrip("/")
        view = (await http(address, "/api/v1/fleet")).json()
        assert view["aggregator"] == "cloud" and view["version"] == 1
        assert (await http(address, "/")).status == 200
        assert (await http(address, "/api/v1/fleet", method="POST")).status == 405
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()


async def test_cloud_run_http_bad_address_and_missing_extra_are_clear(tmp_path: Path) -> None:
    proc = await _cloud_run(tmp_path, "--http", "nowhere")
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and b"--http wants HOST:PORT" in out, out
    # without the cloud extra: says what to install
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('starlette', 'uvicorn'):\n"
        "            raise ImportError(f'{name} blocked (no cloud extra)')\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker),
                                                               ENV.get("PYTHONPATH")]))}
    proc = await _cloud_run(tmp_path, "--http", "127.0.0.1:0", env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, out
    assert b"pip install 'syncfw[cloud]'" in out, out
