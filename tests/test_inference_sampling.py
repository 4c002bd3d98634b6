"""Sampling for retraining: pure decisions, biased to unsure cases, bounded ring, exact round trip."""

from __future__ import annotations

import numpy as np
import pytest

from syncfw.inference import Sampler, SamplingPolicy, decode_sample, encode_sample


def test_decision_is_pure_and_biased_to_low_confidence() -> None:
    p = SamplingPolicy(base_rate=0.05, low_confidence_below=0.7, low_confidence_rate=0.5)
    assert p.probability(0.99) == 0.05
    assert p.probability(0.6) == 0.5
    assert p.decide(0.99, 0.04)
    assert not p.decide(0.99, 0.06)
    assert p.decide(0.6, 0.49)
    assert not p.decide(0.6, 0.51)


def test_rates_over_many_draws() -> None:
    sampler = Sampler(
        SamplingPolicy(base_rate=0.05, low_confidence_rate=0.5, max_samples=10**6), seed=3
    )
    sure = sum(sampler.choose(0.99, 100) is not None for _ in range(20_000)) / 20_000
    unsure = sum(sampler.choose(0.5, 100) is not None for _ in range(20_000)) / 20_000
    assert 0.04 < sure < 0.06
    assert 0.48 < unsure < 0.52


def test_seeded_and_ring_bounded() -> None:
    policy = SamplingPolicy(base_rate=0.5, max_samples=4)
    a = [Sampler(policy, seed=9).choose(0.9, 10) for _ in range(1)]
    s1, s2 = Sampler(policy, seed=9), Sampler(policy, seed=9)
    seq1 = [s1.choose(0.9, 10) for _ in range(50)]
    seq2 = [s2.choose(0.9, 10) for _ in range(50)]
    assert seq1 == seq2
    assert a[0] == seq1[0]
    slots = [s for s in seq1 if s is not None]
    assert set(slots) <= {0, 1, 2, 3}
    assert slots[:6] == [0, 1, 2, 3, 0, 1]


def test_oversized_inputs_are_never_kept() -> None:
    sampler = Sampler(SamplingPolicy(base_rate=1.0, max_sample_bytes=1000))
    assert sampler.choose(0.9, 1001) is None
    assert sampler.choose(0.9, 1000) == 0


@pytest.mark.parametrize("field", ["base_rate", "low_confidence_rate", "low_confidence_below"])
def test_policy_validates(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingPolicy(**{field: 1.5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_samples"):
        SamplingPolicy(max_samples=0)


def test_encode_decode_round_trip() -> None:
    feeds = {
        "image": np.random.default_rng(0).random((1, 1, 4, 4), dtype=np.float32),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    back = decode_sample(encode_sample(feeds))
    assert back.keys() == feeds.keys()
    for k in feeds:
        np.testing.assert_array_equal(back[k], feeds[k])
        assert back[k].dtype == feeds[k].dtype
        assert back[k].flags.writeable
