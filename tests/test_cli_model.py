"""``syncfw model optimize``: the table, the JSON, the refusal over budget (exit 3), bad input (exit 2)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from syncfw.cli import main
from syncfw.inference import train

pytest.importorskip("onnxruntime.quantization")

MODEL = str(train.MODEL_PATH)
CALIBRATION = str(train.CALIBRATION_PATH)


def _raw_calibration(tmp_path: Path) -> str:
    """The bad variant's slip: calibration frames at 0..255 instead of [0, 1]."""
    with np.load(train.CALIBRATION_PATH) as data:
        raw = data["x"].astype(np.float32)
    path = tmp_path / "raw.npy"
    np.save(path, raw)
    return str(path)


def test_optimize_prints_the_table_and_writes_the_int8_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "inspection.int8.onnx"
    code = main(
        ["model", "optimize", MODEL, "--int8", "--calibration", CALIBRATION, "--out", str(out)]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].split() == ["FP32", "INT8"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
    assert list(rows) == ["accuracy", "p50", "p99", "size"]
    assert rows["accuracy"][0] == "96.00%"
    assert rows["p50"][1] == "ms" and rows["p99"][3] == "ms"
    assert rows["size"] == [str(train.MODEL_PATH.stat().st_size), "B", str(out.stat().st_size), "B"]
    assert "within budget" in text
    assert f"wrote {out}" in text
    proto = onnx.load(str(out))
    assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
    assert list(tmp_path.iterdir()) == [out]  # the temporary file was renamed into place


def test_optimize_json_is_one_object_and_the_default_out_is_beside_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "inspection.onnx"
    shutil.copy(train.MODEL_PATH, model)
    code = main(["model", "optimize", str(model), "--int8", "--calibration", CALIBRATION, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    doc = json.loads(out)
    assert doc["passed"] is True and doc["refused"] is None
    assert doc["out"] == str(tmp_path / "inspection.int8.onnx")
    assert (tmp_path / "inspection.int8.onnx").stat().st_size == doc["int8"]["size"]
    assert doc["canary_samples"] == 400 and doc["budget_points"] == 2.0
    assert doc["fp32"]["accuracy"] == 0.96
    assert doc["loss_points"] == pytest.approx(
        (doc["fp32"]["accuracy"] - doc["int8"]["accuracy"]) * 100
    )
    for side in ("fp32", "int8"):
        assert 0 < doc[side]["p50_ms"] <= doc[side]["p99_ms"]


def test_over_budget_is_refused_with_both_figures_exit_3_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8.onnx"
    raw = _raw_calibration(tmp_path)
    code = main(["model", "optimize", MODEL, "--int8", "--calibration", raw, "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 3, text
    assert "OVER BUDGET" in text
    refusal = next(
        line for line in text.splitlines() if line.startswith("syncfw model optimize: refused")
    )
    assert "fp32 96.00%" in refusal  # both figures: FP32, and INT8 in the 70s
    assert re.search(r"int8 accuracy 7\d\.\d\d%", refusal), refusal
    assert "nothing written" in refusal
    assert not out.exists()
    code = main(
        ["model", "optimize", MODEL, "--int8", "--calibration", raw, "--out", str(out), "--json"]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 3
    assert doc["passed"] is False and doc["out"] is None
    assert "96.00%" in doc["refused"]
    assert doc["loss_points"] > 2
    assert not out.exists()
    # The budget is the gate: wide enough, the same model passes.
    code = main(
        [
            "model",
            "optimize",
            MODEL,
            "--int8",
            "--calibration",
            raw,
            "--out",
            str(out),
            "--budget",
            "30",
        ]
    )
    assert code == 0
    assert out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibration", CALIBRATION], "choose an optimization: --int8"),
        (["--int8"], "--int8 needs --calibration"),
        (
            ["--int8", "--calibration", "/nonexistent/cal.npz"],
            "calibration set /nonexistent/cal.npz does not exist",
        ),
        (["--int8", "--calibration", CALIBRATION, "--budget", "-1"], "--budget must be"),
        (["--int8", "--calibration", CALIBRATION, "--canary", CALIBRATION], "no 'y' (labels)"),
        (["--int8", "--calibration", CALIBRATION, "--out", MODEL], "is the model itself"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["model", "optimize", MODEL, *args])
    out = capsys.readouterr().out
    assert code == 2
    assert out.startswith("syncfw model optimize: ")
    assert message in out
    assert len(out.strip().splitlines()) == 1


def test_a_corrupt_model_is_one_line_on_stderr_with_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(train.MODEL_PATH.read_bytes()[:1000])
    code = main(["model", "optimize", str(bad), "--int8", "--calibration", CALIBRATION, "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""  # stdout is data with --json
    assert "not a readable ONNX model" in captured.err
    assert not (tmp_path / "corrupt.int8.onnx").exists()


def test_model_verb_needs_a_sub_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["model"])
    assert exc.value.code == 2
    assert "required: VERB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["model", "--help"])
    assert exc.value.code == 0
    assert "optimize" in capsys.readouterr().out


def test_without_the_inference_extra_the_verb_says_what_to_install(tmp_path: Path) -> None:
    blocker = (
        "import importlib.abc, sys\n"
        "class _Base(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in {'numpy', 'onnx', 'onnxruntime'}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Base())\n"
        "from syncfw.cli import main\n"
        f"sys.exit(main(['model', 'optimize', {MODEL!r}, '--int8', '--calibration', {CALIBRATION!r}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", blocker],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "needs the inference extra" in out.stdout
    assert "pip install 'syncfw[inference]'" in out.stdout
