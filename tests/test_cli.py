"""The syncfw command: every verb has help and is documented; demo and inspect work."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from syncfw.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("verb", verbs())
def test_every_verb_has_help_and_is_in_the_readme(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage: syncfw " + verb in capsys.readouterr().out
    assert f"syncfw {verb}" in (ROOT / "README.md").read_text()


def test_demo_converges_and_inspect_describes_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path), "--quick", "--frames", "5", "--insecure",
                 "--no-nats"]) == 0
    out = capsys.readouterr().out
    assert "[ok  ] all replicas identical: 7 nodes" in out
    assert "the cloud differs" in out  # the partition was real
    assert "refused:" in out
    assert "cloud holds the site's inference results: t7 10, t9 10, t12 10, t14 10, station-8 10" in out
    assert main(["inspect", str(tmp_path / "t9.db"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["node_id"] == "t9" and info["fleet_id"] == "demo-mine"
    assert set(info["version_vector"]) == {"cloud", "depot", "t7", "t9", "t12", "t14", "station-8"}
    assert {z["prefix"] for z in info["zones"]} >= {"trucks/t7/", "site/", "sys/"}
    assert main(["inspect", str(tmp_path / "t9.db")]) == 0
    text = capsys.readouterr().out
    assert "version vector" in text and "trucks/t7/" in text


def test_inspect_refuses_bad_files_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable SQLite database" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing.db")]) == 2
    assert "does not exist" in capsys.readouterr().out
    folder = tmp_path / "nodes"
    folder.mkdir()
    assert main(["inspect", str(folder)]) == 2
    assert f"{str(folder)!r} is a directory, not a syncfw database" in capsys.readouterr().out


def test_console_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "syncfw", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in out and "inspect" in out


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"syncfw {importlib.metadata.version('syncfw')}\n"


def test_the_readme_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text()
    first = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(first, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "truck-7.db").exists()


def test_the_readme_opens_with_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in block.strip().splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
