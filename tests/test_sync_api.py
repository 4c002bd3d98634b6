"""The public surface of sync, codec, transport, mesh and testing: __all__ is complete and true."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "syncfw.codec",
    "syncfw.sync",
    "syncfw.sync.frames",
    "syncfw.sync.session",
    "syncfw.transport.base",
    "syncfw.transport.wire",
    "syncfw.transport.memory",
    "syncfw.transport.rpc",
    "syncfw.transport.network",
    "syncfw.exchange",
    "syncfw.exchange.performer",
    "syncfw.exchange.runner",
    "syncfw.exchange.pair",
    "syncfw.mesh",
    "syncfw.mesh.budget",
    "syncfw.mesh.config",
    "syncfw.mesh.membership",
    "syncfw.mesh.mesh",
    "syncfw.mesh.models",
    "syncfw.testing.memory",
    "syncfw.testing.ops",
    "syncfw.testing.sim",
    "syncfw.testing.conformance",
    "syncfw.testing.sqlite_node",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_complete_and_documented(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__doc__, f"{name} has no docstring"
    exported = set(getattr(mod, "__all__", ()))
    assert exported, f"{name} has no __all__"
    for attr in exported:
        assert hasattr(mod, attr), f"{name}.__all__ names missing {attr}"
    defined = {
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == name
    }
    missing = defined - exported
    assert not missing, f"{name} defines public {sorted(missing)} outside __all__"
    for attr in exported:
        obj = getattr(mod, attr)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name}.{attr} has no docstring"


def test_package_docstrings_say_what_they_own_and_may_import() -> None:
    for pkg in (
        "syncfw.sync",
        "syncfw.transport",
        "syncfw.exchange",
        "syncfw.mesh",
        "syncfw.testing",
    ):
        doc = importlib.import_module(pkg).__doc__ or ""
        assert "Owns" in doc or "owns" in doc, pkg
        assert "import" in doc, pkg


def test_sync_and_codec_import_no_io() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "syncfw"
    banned = {
        "asyncio",
        "grpc",
        "socket",
        "sqlite3",
        "aiosqlite",
        "syncfw.store",
        "syncfw.node",
        "syncfw.transport",
        "syncfw.mesh",
    }
    for path in [root / "codec.py", *sorted((root / "sync").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not any(n == b or n.startswith(b + ".") for b in banned), (
                    f"{path.name} imports {n}"
                )
