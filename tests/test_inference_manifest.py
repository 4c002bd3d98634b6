"""Loading a model held in memory against its manifest: size, sha256 and signature checked first."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest_inference import MODEL_PATH, TRIGGER_PATH, canary, node, result_keys

from syncfw import Node
from syncfw.inference import Engine, EngineConfig, ModelLoadError, ModelManifest, TensorSpec

__all__ = ["node"]


def _shipped(path: Path = MODEL_PATH) -> tuple[bytes, ModelManifest]:
    data = path.read_bytes()
    return data, ModelManifest.of(data)


def test_a_manifest_describes_the_shipped_model() -> None:
    data, m = _shipped()
    assert (m.name, m.version, m.labels) == ("inspection", "1.0.0", ("ok", "defect"))
    assert m.size == len(data) and m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.inputs == (TensorSpec("image", "float32", (None, 1, 16, 16)),)
    assert [s.name for s in m.outputs] == ["probs"]
    m.verify(data)  # the bytes it was made from pass
    renamed = ModelManifest.of(data, name="inspect-v2", version="2.0.0", labels=["a", "b"])
    assert (renamed.name, renamed.version, renamed.labels) == ("inspect-v2", "2.0.0", ("a", "b"))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": ""}, "name and a version"),
        ({"version": ""}, "name and a version"),
        ({"sha256": "abc"}, "64 hex digits"),
        ({"sha256": "z" * 64}, "64 hex digits"),
        ({"size": -1}, "size"),
    ],
)
def test_a_malformed_manifest_is_refused(changes: dict[str, object], match: str) -> None:
    _, m = _shipped()
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(m, **changes)  # type: ignore[arg-type]


async def test_a_model_in_memory_serves_and_its_results_carry_the_manifest(node: Node) -> None:
    data, m = _shipped()
    m = dataclasses.replace(m, name="inspect-mem", version="7.1.0", sha256=m.sha256.upper())
    x, _ = canary()
    async with Engine(node) as engine:
        info = await engine.load(data, m)
        assert (info.name, info.version, info.sha256) == ("inspect-mem", "7.1.0", m.sha256)
        assert info.sha256 == hashlib.sha256(data).hexdigest()  # normalised to lower case
        assert info.path == "" and info.size == len(data) and info.labels == ("ok", "defect")
        r = await engine.infer(x[:1], key="p1")
    assert r.key == "results/t7/inspect-mem/p1"
    stored = await node.get(r.key)
    assert stored["model"] == {"name": "inspect-mem", "version": "7.1.0", "sha256": m.sha256}


async def test_bytes_and_a_file_give_the_same_predictions(node: Node) -> None:
    data, m = _shipped()
    x, _ = canary()
    async with Engine(node) as mem, Engine(node, EngineConfig(status_name=None)) as file:
        await mem.load(data, m)
        await file.load(MODEL_PATH)
        for i in range(5):
            a, b = await mem.infer(x[i : i + 1]), await file.infer(x[i : i + 1])
            np.testing.assert_array_equal(a.outputs["probs"], b.outputs["probs"])


def _corrupt_one_byte(data: bytes) -> bytes:
    mid = len(data) // 2  # a weight byte: the model would still load, and answer wrongly
    return data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1 :]


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("one byte", "sha256 .* the manifest says"),
        ("truncated", r"\d+ bytes, the manifest says 66705"),
        ("one extra byte", r"66706 bytes, the manifest says 66705"),
        ("other model", "bytes, the manifest says 66705"),
    ],
)
async def test_bytes_that_are_not_what_the_manifest_says_are_refused_and_the_old_model_serves(
    node: Node, damage: str, match: str
) -> None:
    data, m = _shipped()
    assert m.size == 66705
    bad = {
        "one byte": _corrupt_one_byte(data),
        "truncated": data[:-100],
        "one extra byte": data + b"\x00",
        "other model": TRIGGER_PATH.read_bytes(),
    }[damage]
    x, _ = canary()
    async with Engine(node) as engine:
        before = await engine.load(TRIGGER_PATH)
        with pytest.raises(ModelLoadError, match=match) as err:
            await engine.load(bad, m)
        assert "'inspection' 1.0.0 (in memory)" in str(err.value)
        assert engine.model is not None and engine.model.sha256 == before.sha256
        r = await engine.infer(x[:1])
        assert r.model.sha256 == before.sha256
        assert engine.status()["loads"] == {"ok": 1, "failed": 1}
    assert [k.split("/")[2] for k in await result_keys(node)] == ["trigger"]


async def test_a_first_load_refused_leaves_no_model(node: Node) -> None:
    data, m = _shipped()
    bad = _corrupt_one_byte(data)
    async with Engine(node) as engine:
        with pytest.raises(ModelLoadError, match="sha256"):
            await engine.load(bad, m)
        assert engine.model is None
        # Only the manifest stood in the way: the same bytes with their own manifest load.
        assert (await engine.load(bad, ModelManifest.of(bad))).sha256 != m.sha256


async def test_a_signature_other_than_the_manifest_declares_is_refused(node: Node) -> None:
    data, m = _shipped()
    wrong = dataclasses.replace(m, inputs=(TensorSpec("image", "float32", (None, 3, 16, 16)),))
    async with Engine(node) as engine:
        with pytest.raises(ModelLoadError, match=r"declares inputs .* the manifest says"):
            await engine.load(data, wrong)
        renamed = dataclasses.replace(m, outputs=(TensorSpec("scores", "float32", (None, 2)),))
        with pytest.raises(ModelLoadError, match="declares outputs"):
            await engine.load(data, renamed)
        assert engine.model is None


async def test_bytes_need_a_manifest_and_a_path_may_have_one(node: Node, tmp_path: Path) -> None:
    data, m = _shipped()
    async with Engine(node) as engine:
        with pytest.raises(TypeError, match="needs its ModelManifest"):
            await engine.load(data)
        info = await engine.load(MODEL_PATH, dataclasses.replace(m, version="9"))
        assert info.version == "9" and info.path == str(MODEL_PATH)
        damaged = tmp_path / "damaged.onnx"
        damaged.write_bytes(_corrupt_one_byte(data))
        with pytest.raises(ModelLoadError, match=r"damaged\.onnx.*sha256"):
            await engine.load(damaged, m)
        assert engine.model is not None and engine.model.version == "9"


async def test_labels_come_from_the_manifest_then_the_engine_then_the_model(node: Node) -> None:
    data, m = _shipped()
    async with Engine(node, labels=("good", "bad")) as engine:
        assert (await engine.load(data, m)).labels == ("ok", "defect")  # the manifest's
        assert (await engine.load(data, dataclasses.replace(m, labels=None))).labels == (
            "good",
            "bad",
        )
    async with Engine(node) as engine:
        info = await engine.load(data, dataclasses.replace(m, labels=None))
        assert info.labels == ("ok", "defect")  # the model's metadata
