"""The expert cache in specmoe mode admits and evicts by predicted use (the latest routing, then
recent use), so a round's fetches do not evict what the next round's draft predicts."""

from __future__ import annotations

import pytest
import torch

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_cache import ExpertCache
from specmoe.offload import ExpertRuntime, completed
from specmoe.sampling import SamplingParams

from test_draft_policies import DelayedSource

NBYTES = 48


def weights_of(e: int):
    return torch.full((4, 2), float(e)), torch.full((2, 2), float(e))  # gate_up [2I, H], down [H, I]: 48 bytes


def round_of(runtime: ExpertRuntime, predicted: set[int], needed: list[int]) -> None:
    """One round on layer 0: the draft predicts and drafts with ``predicted`` (resident ones are
    used as they are, which refreshes nothing), verification runs ``needed``, fetched experts are
    admitted."""
    runtime.phase = "draft"
    runtime.counters.predicted = {0: set(predicted)}
    for e in predicted:
        runtime._draft_weights((0, e))
    runtime.end_draft()
    list(runtime.weights(0, {e: 1 for e in needed}))
    runtime.admit_staged()
    runtime.counters.close_round(score=True)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("predictive", [True, False])
def test_a_round_does_not_evict_what_the_next_round_drafts_with(policy, predictive):
    """Experts 0 and 1 are resident, 0 used before 1. The draft predicts 0 and 2 (its tokens are
    then rejected), verification needs 2 only, and 2 must come in: LRU and LFU evict 0 (its last
    exact use is the oldest; drafting does not count), though the next draft predicts 0 again.
    Predicted use evicts 1, which the round did not route to."""
    fetched = []

    def fetch(layer: int, experts: list[int]):
        fetched.extend(experts)
        return {e: completed(weights_of(e)) for e in experts}

    cache = ExpertCache(2 * NBYTES, policy)
    runtime = ExpertRuntime(fetch, cache, {0: 4}, "resident")
    if predictive:
        cache.priority = runtime.predicted_use
    for e in (0, 1):
        cache.put((0, e), weights_of(e), NBYTES)
    round_of(runtime, predicted={0}, needed=[0])
    round_of(runtime, predicted={1}, needed=[1])
    round_of(runtime, predicted={0, 2}, needed=[2])
    assert cache.resident(0) == ({0, 2} if predictive else {1, 2})
    fetched.clear()
    round_of(runtime, predicted={0}, needed=[0])  # the next round: its draft predicts 0
    assert fetched == ([] if predictive else [0])


def test_a_newcomer_predicted_less_useful_than_every_resident_is_refused():
    """An expert fetched by lookahead that no draft predicted and no verification used is not
    admitted over experts the round routed to."""
    cache = ExpertCache(2 * NBYTES, "lru")
    runtime = ExpertRuntime(lambda layer, experts: {e: completed(weights_of(e)) for e in experts}, cache, {0: 4}, "resident")
    cache.priority = runtime.predicted_use
    for e in (0, 1):
        cache.put((0, e), weights_of(e), NBYTES)
    runtime.request(0, [3], prefetch=True)  # a lookahead guess
    runtime.drain()
    round_of(runtime, predicted={0}, needed=[0, 1])
    assert cache.resident(0) == {0, 1} and cache.stats.refused == 1


def test_specmoe_sets_the_predicted_use_priority_and_stays_exact_for_every_policy_and_migration(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    refs = [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=3)).generate(prompts, params)]
    for policy in ("resident", "shadow", "hot"):
        for migration in ("eager", "deferred"):
            decoder = DecoderConfig(mode="specmoe", draft_policy=policy, k=3, cache_budget=0.25, migration=migration)
            source = DelayedSource(path, 0.01)  # drafts run on their policy while the exact experts are in flight
            engine = Engine(EngineConfig(model=path, max_batch_size=3, decoder=decoder), fetch=source)
            source.runtime = engine.runtime
            assert engine.runtime.cache.priority == engine.runtime.predicted_use
            assert [o.token_ids for o in engine.generate(prompts, params)] == refs, (policy, migration)
            assert engine.counters.drafted_tokens > 0
