"""The one error tree: every SyncfwError subclass is drawn in syncfw.errors and exported."""

from __future__ import annotations

import importlib
import pkgutil
import re

import syncfw
import syncfw.errors
from syncfw.errors import SyncfwError


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= _all_subclasses(sub)
    return out


def _import_everything() -> None:
    # Subclasses defined in any module count, so load every module first
    # (inference modules need the inference extra; they are skipped without it).
    for info in pkgutil.walk_packages(syncfw.__path__, "syncfw."):
        if "._pb" in info.name or info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            if exc.name not in {"numpy", "onnx", "onnxruntime"}:
                raise


def test_every_error_is_drawn_in_the_tree_and_exported() -> None:
    _import_everything()
    tree = syncfw.errors.__doc__ or ""
    classes = {c for c in _all_subclasses(SyncfwError) if c.__module__.startswith("syncfw")}
    assert len(classes) > 20
    drawn = set(re.findall(r"[├└]── (\w+)", tree)) | {"SyncfwError"}
    missing_in_tree = sorted(c.__name__ for c in classes if c.__name__ not in drawn)
    assert not missing_in_tree, f"not drawn in syncfw/errors.py: {missing_in_tree}"
    not_exported = sorted(c.__name__ for c in classes if getattr(syncfw, c.__name__, None) is not c)
    assert not not_exported, f"not exported from syncfw: {not_exported}"


def test_tree_draws_each_class_under_its_base() -> None:
    lines = (syncfw.errors.__doc__ or "").splitlines()
    depth: dict[str, int] = {}
    parent_at: dict[int, str] = {}
    for line in lines:
        stripped = line.lstrip(" │├└─")
        if not stripped or not stripped[0].isupper():
            continue
        name = stripped.split()[0]
        indent = len(line) - len(stripped)
        depth[name] = indent
        parent_at[indent] = name
        base = getattr(syncfw, name, None)
        if base is None or name == "SyncfwError":
            continue
        parents = [parent_at[i] for i in sorted(parent_at) if i < indent]
        assert parents, name
        drawn_parent = getattr(syncfw, parents[-1])
        assert issubclass(base, drawn_parent), f"{name} is drawn under {parents[-1]}"
        # forget deeper levels when we move back up
        for i in [i for i in parent_at if i > indent]:
            del parent_at[i]
