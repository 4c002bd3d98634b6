"""EngineConfig: presets, copies with changes, validation, and what the engine makes of it."""

from __future__ import annotations

import pytest
from conftest_inference import MODEL_PATH, node

from syncfw import Node
from syncfw.inference import DEFAULT_SESSION_CONFIG, Engine, EngineConfig

__all__ = ["node"]


def test_presets_differ_where_they_say_and_edge_is_the_default() -> None:
    edge = EngineConfig.edge()
    assert edge == EngineConfig()
    assert edge.isolation == "thread" and edge.max_batch == 64 and edge.timeout_s == 2.0
    low = EngineConfig.low_latency()
    assert low.max_batch < edge.max_batch and low.timeout_s < edge.timeout_s
    assert low.session_entries["session.intra_op.allow_spinning"] == "1"
    assert edge.session_entries == DEFAULT_SESSION_CONFIG
    assert EngineConfig.isolated().isolation == "process"
    test = EngineConfig.test()
    assert test.timeout_s > edge.timeout_s and test.sample_seed is not None
    assert len({edge, low, EngineConfig.isolated(), test}) == 4  # frozen, hashable, distinct


def test_with_copies_validates_and_refuses_unknown_fields() -> None:
    base = EngineConfig.isolated()
    changed = base.with_(timeout_s=0.5, providers=["CPUExecutionProvider"])
    assert changed.timeout_s == 0.5 and changed.isolation == "process"
    assert changed.providers == ("CPUExecutionProvider",)  # a list is frozen into a tuple
    assert base.timeout_s == 5.0  # the preset is untouched
    with pytest.raises(TypeError):
        base.with_(timeout=1.0)
    with pytest.raises(ValueError, match="timeout_s > 0"):
        base.with_(timeout_s=0)
    with pytest.raises(ValueError, match="max_batch >= 1"):
        EngineConfig(max_batch=0)
    with pytest.raises(AttributeError):
        base.timeout_s = 1.0  # type: ignore[misc]


def test_session_config_is_normalised_and_overrides_the_defaults() -> None:
    cfg = EngineConfig().with_(session_config={"session.intra_op.allow_spinning": "1", "a.b": "2"})
    assert cfg.session_config == (("a.b", "2"), ("session.intra_op.allow_spinning", "1"))
    assert cfg.session_entries == {"session.intra_op.allow_spinning": "1", "a.b": "2"}
    hash(cfg)


async def test_the_engine_serves_as_its_config_says(node: Node) -> None:
    cfg = EngineConfig.low_latency().with_(status_name="fast", warmup_runs=0)
    async with Engine(node, cfg) as engine:
        assert engine.config is cfg
        assert (engine.timeout_s, engine.max_batch, engine.isolation) == (0.5, 4, "thread")
        await engine.load(MODEL_PATH)
        status = await node.status()
    assert "fast" in status and "inference" not in status
