"""Baseline modes that the benchmarks set against specmoe: ``caching`` (a static hot set).

Exact like every mode: greedy tokens equal the resident run's, token for token.
"""

from __future__ import annotations

import pytest

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.profile import RoutingProfile, record_profile
from specmoe.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
    path = checkpoints[("mixtral", "per_expert")]
    resident = Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS)))
    refs = [o.token_ids for o in resident.generate(PROMPTS, PARAMS)]
    profile = tmp_path_factory.mktemp("profile") / "profile.json"
    record_profile(Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS))), PROMPTS, max_new_tokens=4).save(profile)
    return path, refs, profile


def test_caching_is_exact_and_keeps_only_its_static_hot_set(setup):
    path, refs, profile = setup
    decoder = DecoderConfig(mode="caching", profile=profile, cache_budget=1.0)  # the budget does not grow the set
    engine = Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS), decoder=decoder))
    assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == refs
    runtime = engine.runtime
    total = sum(runtime.num_experts.values())
    hot = RoutingProfile.load(profile).ranked()[: max(1, round(0.10 * total))]
    assert set(runtime.cache.entries) == set(runtime.cache.pinned) == set(hot)
    assert runtime.counters.misses > 0 and engine.counters.drafted_tokens == 0


def test_caching_needs_a_profile():
    with pytest.raises(ValueError, match="mode 'caching' pins the routing profile's hottest experts: give a profile"):
        DecoderConfig(mode="caching")
