"""The public surface: __all__ is complete and importable; one error root."""

from __future__ import annotations

import inspect

import syncfw
import syncfw.errors


def test_all_names_exist_and_public_errors_are_exported() -> None:
    for name in syncfw.__all__:
        assert hasattr(syncfw, name), name
    for name in syncfw.errors.__all__:
        assert name in syncfw.__all__, f"{name} is not exported from syncfw"


def test_every_error_derives_from_the_one_root_and_is_drawn_in_the_tree() -> None:
    doc = syncfw.errors.__doc__ or ""
    for name, obj in inspect.getmembers(syncfw.errors, inspect.isclass):
        if obj.__module__ != "syncfw.errors":
            continue
        assert issubclass(obj, syncfw.SyncfwError), name
        assert name in doc, f"{name} is missing from the error tree in syncfw/errors.py"
