"""Attention in bf16 on the CPU runs in float32 (faster there, and more accurate): the result is
float32 attention over the same bf16 keys and values, rounded once to bf16."""

import torch

from specmoe.kv_cache import KVCache
from specmoe.layers import attention_dtype, ragged_attention

HQ, HKV, D = 4, 2, 16


def attend(dtype, steps):
    """Prefill two ragged sequences, then decode; returns each pass's attention output."""
    cache = KVCache(1, 2, 32, HKV, D, dtype)
    slots = [cache.allocate(), cache.allocate()]
    outs = []
    for lens, (q, k, v) in steps:
        batch = cache.batch(slots, lens)
        outs.append(ragged_attention(q.to(dtype), k.to(dtype), v.to(dtype), batch, cache, 0, D**-0.5))
        cache.commit(batch)
    return outs


def test_bf16_attention_is_float32_attention_rounded_once():
    g = torch.Generator().manual_seed(0)
    steps = []
    for lens in ([3, 7], [1, 1], [1, 1]):
        n = sum(lens)
        qkv = [torch.randn(n, h, D, generator=g).bfloat16() for h in (HQ, HKV, HKV)]  # bf16 values
        steps.append((lens, qkv))
    for ours, reference in zip(attend(torch.bfloat16, steps), attend(torch.float32, steps)):
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, reference.bfloat16())


def test_attention_dtype_upcasts_only_reduced_precision_on_the_cpu():
    assert attention_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert attention_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert attention_dtype(torch.zeros(1, dtype=torch.float32)) == torch.float32
    assert attention_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
