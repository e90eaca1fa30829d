"""KV cache rollback: appending then truncating must leave no trace."""

from __future__ import annotations

import pytest
import torch

from specmoe.kv_cache import KVCache
from specmoe.loader import load_model


def greedy_continue(model, cache, slots, last, steps):
    """Decode ``steps`` greedy tokens for every slot; returns tokens [steps][B] and final logits."""
    out = []
    for _ in range(steps):
        logits = model(torch.tensor(last), cache.batch(slots, [1] * len(slots)), cache)
        last = logits.argmax(-1).tolist()
        out.append(last)
    return out, logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_append_then_truncate_is_identical_to_never_appending(family, checkpoints):
    model = load_model(checkpoints[(family, "per_expert")])
    layers, kv_heads, head_dim = model.kv_shape()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    runs = []
    with torch.inference_mode():
        for rollback in (False, True):
            cache = KVCache(layers, 3, 64, kv_heads, head_dim, torch.float32)
            slots = [cache.allocate() for _ in prompts]
            logits = model(torch.tensor(sum(prompts, [])), cache.batch(slots, [len(p) for p in prompts]), cache)
            last = logits.argmax(-1).tolist()
            _, _ = greedy_continue(model, cache, slots, last, 2)  # decode a little first
            lengths = list(cache.lengths[:3])
            if rollback:
                # append 3 tokens to each sequence (a rejected draft), then roll back
                model(torch.tensor([40, 41, 42] * 3), cache.batch(slots, [3, 3, 3]), cache)
                assert [cache.lengths[s] for s in slots] == [n + 3 for n in lengths]
                for s, n in zip(slots, lengths):
                    cache.truncate(s, n)
            tokens, logits = greedy_continue(model, cache, slots, [1, 2, 3], 6)
            runs.append((tokens, logits))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_truncate_rejects_growing_and_negative_lengths():
    cache = KVCache(1, 2, 8, 1, 4, torch.float32)
    slot = cache.allocate()
    cache.lengths[slot] = 5
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(slot, 6)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(slot, -1)
    cache.truncate(slot, 2)
    assert cache.lengths[slot] == 2


def test_appending_past_max_len_is_an_error():
    cache = KVCache(1, 1, 8, 1, 4, torch.float32)
    slot = cache.allocate()
    with pytest.raises(ValueError, match="max_model_len is 8"):
        cache.batch([slot], [9])


def test_slots_are_reused_lowest_first_so_batches_stay_consecutive():
    cache = KVCache(1, 4, 8, 1, 4, torch.float32)
    slots = [cache.allocate() for _ in range(4)]
    assert slots == [0, 1, 2, 3]
    cache.release(2)
    cache.release(0)
    assert cache.allocate() == 0
    assert cache.allocate() == 2
    with pytest.raises(RuntimeError, match="no free KV slot"):
        cache.allocate()
    assert cache.batch([0, 1, 2], [1, 1, 1]).slot_range == (0, 3)
    assert cache.batch([0, 2], [1, 1]).slot_range is None
