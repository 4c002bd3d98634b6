"""Lean installs: a base install runs a gRPC mesh with no numpy, onnx or onnxruntime.

A subprocess Python gets a ``sitecustomize`` that makes the inference extra's
modules unimportable (as on a base ``pip install syncfw``), then imports
syncfw, meshes two SQLite nodes over gRPC on loopback and checks that nothing
pulled the extra in. The wheel is built for real and listed: it ships the
``.proto`` files and declares the extras.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import syncfw
from syncfw.cli import version

ROOT = Path(__file__).resolve().parent.parent
EXTRA = ("numpy", "onnx", "onnxruntime")

SITECUSTOMIZE = f"""
import importlib.abc
import sys

BLOCKED = {set(EXTRA)!r}


class _BaseInstall(importlib.abc.MetaPathFinder):
    # What a base install lacks cannot be found, whatever this venv holds.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (base install)", name=name)
        return None


sys.meta_path.insert(0, _BaseInstall())
"""

TWO_NODES = """
import asyncio
import json
import sys
from pathlib import Path

for name in {extra!r}:
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(f"{{name}} is importable: the base-install blocker is not in force")

import syncfw
import syncfw.cli
import syncfw.mesh
import syncfw.node
from syncfw.mesh import MeshConfig
from syncfw.testing.waiting import wait_until

FLEET = syncfw.Fleet(fleet_id="lean", authority="a", grants=(syncfw.Grant.of("site/", "*"),))


async def main(folder: Path) -> None:
    async with (
        syncfw.Node.open(folder / "a.db", node_id="a", fleet=FLEET) as a,
        syncfw.Node.open(folder / "b.db", node_id="b", fleet=FLEET) as b,
    ):
        mesh = await a.serve("127.0.0.1:0", config=MeshConfig.test())
        await b.serve("127.0.0.1:0", [mesh.address], config=MeshConfig.test())
        await a.put("site/greeting", {{"from": "a"}})
        await b.put("site/reply", {{"from": "b"}})

        async def both_arrived() -> bool:
            return (await b.get("site/greeting") == {{"from": "a"}}
                    and await a.get("site/reply") == {{"from": "b"}})

        await wait_until(both_arrived, timeout_s=30, what="the writes to cross the gRPC mesh")
        assert await a.state_digest() == await b.state_digest()


asyncio.run(main(Path(sys.argv[1])))
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in {extra!r})))
"""


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess in which the inference extra is not installed."""
    site = tmp_path / "base-install"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env["GRPC_VERBOSITY"] = "NONE"
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_the_blocker_makes_the_extra_unimportable(base_env: dict[str, str], tmp_path: Path) -> None:
    # Guards the tests below: without the blocker they would pass on any venv.
    proc = _run(["-c", "import numpy"], base_env, tmp_path)
    assert proc.returncode == 1
    assert "ModuleNotFoundError: No module named 'numpy' (base install)" in proc.stderr


def test_a_base_install_runs_a_two_node_grpc_mesh(base_env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES.format(extra=EXTRA))
    proc = _run([str(script), str(tmp_path)], base_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # nothing of the extra loaded
    assert (tmp_path / "a.db").exists() and (tmp_path / "b.db").exists()


def test_version_on_a_base_install(base_env: dict[str, str], tmp_path: Path) -> None:
    proc = _run(["-m", "syncfw", "--version"], base_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"syncfw {importlib.metadata.version('syncfw')}\n"


def test_version_agrees_with_the_package_and_falls_back_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert importlib.metadata.version("syncfw") == syncfw.__version__

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version() == syncfw.__version__


def test_demo_without_the_extra_names_what_to_install(base_env: dict[str, str], tmp_path: Path) -> None:
    proc = _run(["-m", "syncfw", "demo", "--dir", str(tmp_path / "demo")], base_env, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pip install 'syncfw[inference]'" in lines[0] and "numpy" in lines[0]
    assert proc.stdout == ""
    assert not list(tmp_path.glob("demo/*.db"))  # refused before starting anything


def test_inspect_on_a_base_install(base_env: dict[str, str], tmp_path: Path) -> None:
    proc = _run(["-m", "syncfw", "inspect", str(tmp_path / "missing.db")], base_env, tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stdout


# -- what the distribution declares and ships --------------------------------------


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_grpcio_range_covers_the_stubs_and_the_installed_runtime() -> None:
    deps = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]  # type: ignore[index]
    grpcio = next(r for r in deps if r.name == "grpcio")
    floors = [Version(s.version) for s in grpcio.specifier if s.operator == ">="]
    assert floors and any(s.operator == "<" for s in grpcio.specifier), "grpcio needs a range"
    # The stubs come from the grpcio-tools series held in [dev]; gRPC's generated code
    # needs a runtime at least that new, so the floor must not fall below that series.
    tools = Version(importlib.metadata.version("grpcio-tools"))
    assert floors[0].release[:2] >= tools.release[:2], (
        f"stubs are generated by grpcio-tools {tools}: raise the grpcio floor {floors[0]}"
    )
    assert grpcio.specifier.contains(importlib.metadata.version("grpcio"))


def test_the_packaged_protos_are_the_protos() -> None:
    sources = {p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*.proto")}
    copies = {p.relative_to(ROOT / "syncfw" / "protos") for p in (ROOT / "syncfw" / "protos").rglob("*.proto")}
    assert sources and copies == sources
    differ = [str(p) for p in sorted(sources) if (ROOT / "protos" / p).read_bytes()
              != (ROOT / "syncfw" / "protos" / p).read_bytes()]
    assert not differ, f"syncfw/protos/ is stale for {differ}: copy them from protos/"


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # A copy, so the build's build/ and egg-info never land in the working tree.
    shutil.copytree(
        ROOT / "syncfw", src / "syncfw", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wheel,) = out.glob("syncfw-*.whl")
    return wheel


def test_the_wheel_ships_protos_and_declares_the_extras(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for proto in (ROOT / "protos").rglob("*.proto"):
            inside = "syncfw/protos/" + proto.relative_to(ROOT / "protos").as_posix()
            assert inside in names, f"{inside} missing from the wheel"
            assert zf.read(inside) == proto.read_bytes()
        assert {"syncfw/py.typed", "syncfw/inference/assets/inspection.onnx",
                "syncfw/transport/_pb/sync_pb2_grpc.py"} <= names
        info = f"syncfw-{syncfw.__version__}.dist-info/"
        meta = email.parser.Parser().parsestr(zf.read(info + "METADATA").decode())
        assert "syncfw = syncfw.cli:main" in zf.read(info + "entry_points.txt").decode()
    assert meta["Version"] == syncfw.__version__
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    base = {r.name for r in reqs if r.marker is None}
    assert {"grpcio", "protobuf", "prometheus_client", "aiosqlite"} <= base
    assert not base & {"numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "grpcio-tools"}

    def extra(name: str) -> set[str]:
        return {r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": name})}

    assert extra("inference") == {"numpy", "onnx", "onnxruntime"}
    assert extra("inference-gpu") == {"numpy", "onnx", "onnxruntime-gpu"}
    assert "grpcio-tools" in extra("dev")
    assert extra("cloud") == {"starlette", "uvicorn", "nats-py"}
    assert not base & {"starlette", "uvicorn", "nats-py"}  # the cloud is an extra
    assert extra("profile") == {"py-spy"}  # the benches' sampling profiler
    assert set(meta.get_all("Provides-Extra")) == {
        "inference", "inference-gpu", "cloud", "dev", "profile"
    }
    static = {n for n in names if n.startswith("syncfw/cloud/static/")}
    assert {"syncfw/cloud/static/index.html", "syncfw/cloud/static/dashboard.js"} <= static


def test_readme_documents_the_installs() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Installing", 1)[1].split("\n## ", 1)[0]
    for line in ("pip install syncfw", "pip install 'syncfw[inference]'",
                 "pip install 'syncfw[inference-gpu]'", "pip install 'syncfw[cloud]'"):
        assert line in section
    assert "-e '.[dev,inference,cloud]'" in (ROOT / "Makefile").read_text()


def test_no_module_outside_inference_imports_the_extra() -> None:
    offenders = []
    for path in sorted((ROOT / "syncfw").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("syncfw/inference/"):
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            # Only module-level imports: the demo imports the extra inside functions.
            if line == line.lstrip() and words[:1] in (["import"], ["from"]) and \
                    words[1].partition(".")[0] in EXTRA:
                offenders.append(f"{rel}: {line}")
    assert not offenders, offenders
