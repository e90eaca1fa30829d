"""Expert cache budget and eviction, prediction scoring, the k controller, quantization."""

from __future__ import annotations

import random

import pytest
import torch

from specmoe.expert_cache import ExpertCache
from specmoe.offload import FetchCounters, prediction_counts
from specmoe.profile import RoutingProfile
from specmoe.quant import quantize


def test_cache_never_exceeds_its_budget_under_random_traffic():
    cache = ExpertCache(budget_bytes=1000, policy="lru")
    rng = random.Random(0)
    cache.put((0, 0), "hot", 300, pin=True)
    for _ in range(2000):
        key = (rng.randrange(4), rng.randrange(8))
        if cache.get(key) is None:
            cache.put(key, "w", rng.choice([100, 150, 250, 400]))
        assert cache.used_bytes <= cache.budget
        assert cache.used_bytes == sum(n for _, n in cache.entries.values())
        assert (0, 0) in cache  # pinned: never evicted
    assert cache.peak_bytes <= cache.budget


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(300, "lru")
    for e in range(3):
        cache.put((0, e), e, 100)
    cache.get((0, 0))
    cache.put((0, 3), 3, 100)
    assert sorted(e for _, e in cache.entries) == [0, 2, 3]


def test_lfu_evicts_least_frequently_used():
    cache = ExpertCache(300, "lfu")
    for e in range(3):
        cache.put((0, e), e, 100)
    for _ in range(3):
        cache.get((0, 0))
    cache.get((0, 1))
    cache.get((0, 2))
    cache.get((0, 2))
    cache.put((0, 3), 3, 100)
    assert sorted(e for _, e in cache.entries) == [0, 2, 3]


def test_an_expert_that_cannot_fit_is_refused_not_forced_in():
    cache = ExpertCache(250, "lru")
    cache.put((0, 0), "pinned", 200, pin=True)
    assert not cache.put((0, 1), "big", 100)
    assert not cache.put((0, 2), "huge", 300)
    assert cache.used_bytes == 200 and cache.stats.refused == 2


def test_hit_rate_and_residency():
    cache = ExpertCache(1000, "lfu")
    cache.put((1, 4), "w", 10)
    cache.put((2, 4), "w", 10)
    assert cache.get((1, 4)) == "w" and cache.get((1, 5)) is None
    assert cache.stats.hit_rate == 0.5
    assert cache.resident(1) == {4}


def test_bad_cache_arguments():
    with pytest.raises(ValueError, match="allowed: lru, lfu"):
        ExpertCache(10, "fifo")
    with pytest.raises(ValueError, match=">= 0 bytes"):
        ExpertCache(-1, "lfu")
    with pytest.raises(ValueError, match="layer_floor"):
        ExpertCache(10, "lfu", layer_floor=-1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_admitting_later_layers_never_empties_an_earlier_one(policy):
    """End of a round admits layer 0's experts first, then layer 1's, ...: without a floor the
    newest (least used, oldest among equals) evict each other and the first layers end empty."""
    cache = ExpertCache(400, policy, layer_floor=1)
    for rnd in range(3):
        for layer in range(4):
            for e in (rnd, rnd + 4):
                cache.put((layer, e), "w", 100)
        assert all(len(cache.resident(layer)) == 1 for layer in range(4)), cache.entries.keys()
    cache.get((2, 6))
    cache.put((2, 7), "w", 100)  # a newcomer may replace its own layer's share
    assert cache.resident(2) == {7} and cache.used_bytes == 400
    floorless = ExpertCache(400, policy)
    for layer in range(4):
        for e in (0, 4):
            floorless.put((layer, e), "w", 100)
    assert not floorless.resident(0)


def test_prediction_precision_and_recall_on_a_hand_made_trace():
    # round 1: layer 0 predicted {1,2,3}, needed {2,3,4}; layer 1 predicted {0}, needed {0,5}
    # round 2: layer 0 predicted {1}, needed {1}; layer 1 predicted {2,6}, needed {6}
    # tp = 2+1+1+1 = 5; predicted = 3+1+1+2 = 7; needed = 3+2+1+1 = 7
    counters = FetchCounters()
    counters.predicted, counters.needed = {0: {1, 2, 3}, 1: {0}}, {0: {2, 3, 4}, 1: {0, 5}}
    counters.close_round(score=True)
    counters.predicted, counters.needed = {0: {1}, 1: {2, 6}}, {0: {1}, 1: {6}}
    counters.close_round(score=True)
    counters.predicted, counters.needed = {}, {0: {7}}  # a prefill round is not scored
    counters.close_round(score=False)
    assert counters.precision == pytest.approx(5 / 7)
    assert counters.recall == pytest.approx(5 / 7)
    assert prediction_counts({0: {1, 2}}, {0: {2}, 1: {3}}) == (1, 2, 2)


@pytest.mark.parametrize("bits, tolerance", [(8, 0.01), (4, 0.16)])
def test_groupwise_quantization_round_trip(bits, tolerance):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, bits, group_size=32)
    err = (q.dequantize() - w).abs()
    # each value is off by at most half a quantization step of its group
    step = w.reshape(48, 2, 32).abs().amax(-1) / (127 if bits == 8 else 7)
    assert torch.all(err.reshape(48, 2, 32) <= step[..., None] / 2 + 1e-3)
    assert err.max() < tolerance * w.abs().max()
    assert q.nbytes == (48 * 64 * bits) // 8 + 48 * 2 * 2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cols", [80, 48, 30])  # hidden 80, expert intermediate 48: not multiples of 32
def test_quantize_pads_the_last_group_of_any_width(bits, cols):
    w = torch.randn(6, cols, generator=torch.Generator().manual_seed(1))
    q = quantize(w, bits, group_size=32)
    groups = -(-cols // 32)
    assert q.shape == (6, cols) and q.scales.shape == (6, groups)
    padded = torch.nn.functional.pad(w, (0, groups * 32 - cols)).reshape(6, groups, 32)
    step = padded.abs().amax(-1) / (127 if bits == 8 else 7)  # [6, G]: the last group's scale ignores the padding
    err = torch.nn.functional.pad(q.dequantize() - w, (0, groups * 32 - cols)).abs().reshape(6, groups, 32)
    assert torch.all(err <= step[..., None] / 2 + 1e-3)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="even for int4"):
        quantize(torch.zeros(4, 30), 4, 15)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        quantize(torch.zeros(4, 30), 8, 1)
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(4, 32), 3, 32)


def test_routing_profile_ranks_and_round_trips(tmp_path):
    p = RoutingProfile("mixtral", 4)
    p.add(0, torch.tensor([[0, 1], [0, 2], [0, 1]]))
    p.add(1, torch.tensor([[3, 2]]))
    assert p.counts == {0: [3, 2, 1, 0], 1: [0, 0, 1, 1]}
    assert p.ranked()[:3] == [(0, 0), (1, 2), (1, 3)]
    p.save(tmp_path / "p.json")
    assert RoutingProfile.load(tmp_path / "p.json") == p
