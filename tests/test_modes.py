"""Exactness of every mode and draft policy: greedy output equals transformers' generate.

Experts come from the checkpoint in-process here; tests/test_decoder_cluster.py runs the same
decoder against a real ExpertStore on another Ray node.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.metrics import summarize
from specmoe.profile import record_profile
from specmoe.sampling import SamplingParams

LENGTHS = (6, 13, 1, 9)  # a one-token prompt prefills and drafts in the same round
NEW_TOKENS = 24

DECODERS = [
    pytest.param(DecoderConfig(mode="resident"), id="resident"),
    pytest.param(DecoderConfig(mode="ondemand"), id="ondemand"),
    pytest.param(DecoderConfig(mode="pregate"), id="pregate"),
] + [
    pytest.param(DecoderConfig(mode="specmoe", draft_policy=policy, k=k, shadow_group_size=8), id=f"specmoe-{policy}-k{k}")
    for policy in ("resident", "shadow")
    for k in (0, 1, 3, "auto")
]


@pytest.fixture(scope="module")
def references(checkpoints):
    """(family, prompts, greedy continuations from transformers), computed once per family."""
    out = {}
    for family in FAMILIES:
        path = checkpoints[(family, "per_expert")]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
        refs = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist() for p in prompts]
        out[family] = (prompts, refs)
    return out


def run(path, decoder, prompts, **engine_kwargs):
    engine = Engine(EngineConfig(model=path, max_batch_size=len(prompts), decoder=decoder, **engine_kwargs))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_equals_generate_in_every_mode(family, decoder, checkpoints, references):
    prompts, refs = references[family]
    tokens, _ = run(checkpoints[(family, "per_expert")], decoder, prompts)
    assert tokens == refs


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_that_is_always_right(family, checkpoints, references, tmp_path):
    """Every expert pinned resident: the draft is the model itself, so every draft token is accepted."""
    prompts, refs = references[family]
    path = checkpoints[(family, "per_expert")]
    profile = record_profile(Engine(EngineConfig(model=path, max_batch_size=4)), prompts, max_new_tokens=4)
    profile.save(tmp_path / "profile.json")
    decoder = DecoderConfig(
        mode="specmoe", draft_policy="resident", k=3, cache_budget=1.0, pinned_fraction=1.0, profile=tmp_path / "profile.json"
    )
    tokens, engine = run(path, decoder, prompts)
    assert tokens == refs
    c = engine.counters
    assert c.drafted_tokens > 0 and c.accepted_tokens == c.drafted_tokens
    assert engine.runtime.counters.misses == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_that_is_always_wrong(family, checkpoints, references):
    """A draft whose experts are forced wrong (the least likely ones, with garbage weights):
    nearly nothing is accepted, and the output is unchanged."""
    prompts, refs = references[family]
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, shadow_group_size=8)
    engine = Engine(EngineConfig(model=checkpoints[(family, "per_expert")], max_batch_size=4, decoder=decoder))
    runtime, route = engine.runtime, engine.runtime.route
    garbage = torch.Generator().manual_seed(0)

    def least_likely(router, x, logits, weights, indices):
        logits, weights, indices = route(router, x, logits, weights, indices)
        if runtime.phase == "draft":
            indices = torch.topk(-logits, router.top_k, dim=-1).indices  # [N, K]
        return logits, weights, indices

    def wrong_weights(key):
        gate_up, down = runtime.shadow[key][0].dequantize(), runtime.shadow[key][1].dequantize()
        return torch.randn(gate_up.shape, generator=garbage), torch.randn(down.shape, generator=garbage)

    for _, block in engine.model.moe_blocks():
        block.gate.hook = least_likely
    runtime._draft_weights = wrong_weights
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outs] == refs
    c = engine.counters
    assert c.drafted_tokens > 0 and c.accepted_tokens <= 0.25 * c.drafted_tokens


def test_shipped_model_in_every_mode(shipped_model):
    hf = AutoModelForCausalLM.from_pretrained(shipped_model, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model)
    texts = ["ROMEO:\nBut soft, what light", "First Citizen:\nWe are", "KING"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist() for p in prompts]
    for decoder in [d.values[0] for d in DECODERS if d.id in ("resident", "ondemand", "pregate", "specmoe-resident-k3", "specmoe-shadow-kauto")]:
        tokens, _ = run(shipped_model, decoder, prompts)
        assert tokens == refs, decoder.mode


def test_metrics_use_the_speculation_vocabulary(checkpoints, references):
    prompts, _ = references["mixtral"]
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=2, shadow_group_size=8)
    tokens, engine = run(checkpoints[("mixtral", "per_expert")], decoder, prompts)
    m = summarize(engine, sum(len(t) for t in tokens), 1.0)
    for name in ("acceptance_rate", "mean_accepted_per_round", "expert_bytes_per_token", "fetch_requests_per_token",
                 "prediction_precision", "prediction_recall", "cache_hit_rate", "stall_s", "peak_decoder_bytes", "shadow_bytes"):
        assert name in m
    assert 0 < m["prediction_recall"] <= 1 and 0 < m["prediction_precision"] <= 1
    assert m["shadow_bytes"] > 0
    assert m["mean_accepted_per_round"] <= 2


def test_sampled_speculative_decoding_is_seeded_deterministic(checkpoints, references):
    prompts, _ = references["qwen2_moe"]
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, shadow_group_size=8)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    runs = []
    for _ in range(2):
        engine = Engine(EngineConfig(model=checkpoints[("qwen2_moe", "per_expert")], max_batch_size=4, decoder=decoder))
        runs.append([o.token_ids for o in engine.generate(prompts, params)])
        assert engine.counters.drafted_tokens > 0
    assert runs[0] == runs[1]
    assert all(len(t) == NEW_TOKENS for t in runs[0])
