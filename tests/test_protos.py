"""The committed gRPC stubs are exactly what protos/ generates today."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PB = ROOT / "syncfw" / "transport" / "_pb"


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    generate = runpy.run_path(str(ROOT / "protos" / "generate.py"))["generate"]
    written = generate(tmp_path)
    assert written, "the generator wrote nothing"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in PB.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "stub files differ: run python protos/generate.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run python protos/generate.py"


def test_stubs_import_inside_the_package() -> None:
    from syncfw.transport._pb import health_pb2, health_pb2_grpc, sync_pb2, sync_pb2_grpc

    frame = sync_pb2.Frame(hello=sync_pb2.Hello(protocol=1, fleet_id="f", node_id="n"))
    again = sync_pb2.Frame.FromString(frame.SerializeToString())
    assert again.WhichOneof("body") == "hello"
    assert again.hello.fleet_id == "f"
    assert hasattr(sync_pb2_grpc, "SyncStub")
    assert hasattr(health_pb2_grpc, "HealthServicer")
    assert health_pb2.HealthCheckResponse.SERVING == 1


def test_frame_oneof_carries_every_message() -> None:
    from syncfw.transport._pb import sync_pb2

    names = {f.name for f in sync_pb2.Frame.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert {"hello", "digest", "summary", "ops", "ack", "peers", "close"} <= names
