"""Our runtime against transformers on every family, in both checkpoint namings (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, NAMINGS
from specmoe.engine import Engine, EngineConfig
from specmoe.kv_cache import KVCache
from specmoe.loader import load_model
from specmoe.sampling import SamplingParams

PROMPT_LENGTHS = (5, 11, 2, 8)


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference_models(checkpoints):
    return {key: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for key, path in checkpoints.items()}


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_a_ragged_batch(family, naming, checkpoints, reference_models):
    hf = reference_models[(family, naming)]
    ours = load_model(checkpoints[(family, naming)], "fp32")
    prompts = prompts_for(hf.config.vocab_size)
    layers, kv_heads, head_dim = ours.kv_shape()
    cache = KVCache(layers, 4, 64, kv_heads, head_dim, torch.float32)
    slots = [cache.allocate() for _ in prompts]

    with torch.inference_mode():
        # prefill all four prompts in one ragged pass; logits for every position
        batch = cache.batch(slots, [len(p) for p in prompts])
        ids = torch.tensor([t for p in prompts for t in p])
        logits = ours(ids, batch, cache, rows=torch.arange(batch.num_tokens))
        for p, (lo, hi) in zip(prompts, zip(batch.offsets, batch.offsets[1:])):
            ref = hf(torch.tensor([p])).logits[0]
            torch.testing.assert_close(logits[lo:hi], ref, atol=1e-4, rtol=0)

        # then a ragged step where sequences append different numbers of tokens
        extra = [[7], [9, 10, 11], [12, 13], [14]]
        batch = cache.batch(slots, [len(e) for e in extra])
        ids = torch.tensor([t for e in extra for t in e])
        logits = ours(ids, batch, cache, rows=torch.arange(batch.num_tokens))
        for p, e, (lo, hi) in zip(prompts, extra, zip(batch.offsets, batch.offsets[1:])):
            ref = hf(torch.tensor([p + e])).logits[0, len(p) :]
            torch.testing.assert_close(logits[lo:hi], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_generate(family, naming, checkpoints, reference_models):
    hf = reference_models[(family, naming)]
    engine = Engine(EngineConfig(model=checkpoints[(family, naming)], max_batch_size=4))
    prompts = prompts_for(hf.config.vocab_size, seed=1)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=32))
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p) :].tolist()
        assert out.token_ids == ref


def test_families_exercise_their_special_parts(checkpoints):
    """Guard that the parity configs really contain what makes each family different."""
    qwen2 = load_model(checkpoints[("qwen2_moe", "per_expert")])
    sparse = [i for i, _ in qwen2.moe_blocks()]
    assert sparse == [0, 2]  # mlp_only_layers=[1] made layer 1 dense
    assert hasattr(qwen2.model.layers[0].mlp, "shared_expert_gate")
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    qwen3 = load_model(checkpoints[("qwen3_moe", "fused")])
    assert qwen3.model.layers[0].self_attn.o_proj.bias is not None
    olmoe = load_model(checkpoints[("olmoe", "fused")])
    assert olmoe.model.layers[0].self_attn.clip_qkv == 0.5
