"""The hot draft policy (the paper's): N pinned experts per layer, a pick outside them drafts
with its nearest pinned expert (by the affinity table, ``specmoe.affinity``), keeping the
router's weight. Verification never uses a substitute: the output stays exact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_cache import ExpertCache
from specmoe.affinity import expert_affinity
from specmoe.offload import ExpertRuntime, completed
from specmoe.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)


def expert(value: float, size: int = 4):
    return torch.full((2 * size, size), value), torch.full((size, size), value)  # gate_up [2I, H], down [H, I]


def test_affinity_orders_experts_by_weight_distance():
    weights = {0: expert(0.0), 1: expert(1.0), 2: expert(0.25), 3: expert(3.0)}
    assert expert_affinity(weights, "l2") == {0: [2, 1, 3], 1: [2, 0, 3], 2: [0, 1, 3], 3: [1, 2, 0]}
    down = dict(weights)  # only the down projection differs: it counts too
    down[1] = (weights[0][0], torch.full((4, 4), 5.0))
    assert expert_affinity(down, "l2")[0][0] == 2 and expert_affinity(down, "l2")[1][-1] == 0


def runtime_with(resident: list[int], num_experts: int = 4) -> ExpertRuntime:
    cache = ExpertCache(10**9, "lru")
    for e in resident:
        cache.put((0, e), expert(float(e)), 1)
    fetch = lambda layer, experts: {e: completed(expert(float(e))) for e in experts}  # noqa: E731
    runtime = ExpertRuntime(fetch, cache, {0: num_experts}, "hot")
    runtime.affinity[0] = {0: [2, 1, 3], 1: [2, 0, 3], 2: [0, 1, 3], 3: [1, 2, 0]}
    runtime.hot_experts = 2
    return runtime


def test_a_pick_outside_the_hot_set_drafts_with_its_nearest_pinned_expert_at_the_router_weight():
    runtime = runtime_with(resident=[0, 1])
    runtime.deferred = True  # nothing arrives during the draft: the substitutes are used
    runtime.phase = "draft"
    logits = torch.zeros(2, 4)  # [N, E]
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])  # [N, K]
    indices = torch.tensor([[3, 2], [0, 3]])  # [N, K]
    _, w, i = runtime.route(SimpleNamespace(layer=0), None, logits, weights, indices)
    assert torch.equal(i, torch.tensor([[1, 0], [0, 1]]))  # 3 -> 1 (its nearest pinned), 2 -> 0
    assert torch.equal(w, weights)  # the router's weights, untouched


def test_the_hot_set_follows_the_experts_recent_exact_passes_used():
    runtime = runtime_with(resident=[0, 1, 2, 3])
    assert runtime.hot_set(0) == {0, 1}  # no history: lowest ids
    runtime.phase = "exact"
    for _ in range(2):
        runtime.weights(0, {2: 1, 3: 1})
        runtime.admit_staged()
    assert runtime.hot_set(0) == {2, 3}


@pytest.fixture(scope="module")
def refs(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    return [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS))).generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("migration", ["eager", "deferred"])
@pytest.mark.parametrize("k", [1, 3])
def test_hot_is_exact(checkpoints, refs, k, migration):
    path = checkpoints[("mixtral", "per_expert")]
    decoder = DecoderConfig(mode="specmoe", draft_policy="hot", hot_experts=2, k=k, cache_budget=0.25, migration=migration)
    engine = Engine(EngineConfig(model=path, max_batch_size=len(PROMPTS), decoder=decoder))
    assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == refs
    assert engine.counters.drafted_tokens > 0 and engine.runtime.affinity


def test_hot_experts_must_be_positive():
    with pytest.raises(ValueError, match="hot_experts must be an integer >= 1, got 0"):
        DecoderConfig(hot_experts=0)
