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
from specmoe.engine import Engine, StepOutput
from specmoe.metrics import summarize
from specmoe.offload import FetchCounters
from specmoe.profile import record_profile
from specmoe.sampling import SamplingParams

LENGTHS = (6, 13, 1, 9)  # ragged, with a one-token prompt (its prefill is a single position)
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


def rounds(engine, prompts, params) -> tuple[list[list[int]], list[StepOutput]]:
    """Run ``prompts`` to completion one round at a time: (tokens per prompt, every StepOutput)."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens, outputs = {i: [] for i in ids}, []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            outputs.append(out)
    return [tokens[i] for i in ids], outputs


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
    engine = Engine(EngineConfig(model=path, max_batch_size=len(prompts), decoder=decoder))
    tokens, outputs = rounds(engine, prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert tokens == refs
    # all accepted; a round that stops inside its draft emits (and counts) the draft up to the stop
    assert all(o.accepted == min(o.drafted, len(o.new_token_ids)) for o in outputs)
    assert all(o.accepted == o.drafted for o in outputs if o.finish_reason != "stop")
    c = engine.counters
    assert c.drafted_tokens > 0 and c.accepted_tokens == sum(o.accepted for o in outputs)
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
        block.gate.remove_hook(route)
        block.gate.add_hook(least_likely)
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


def test_metrics_use_the_speculation_vocabulary(checkpoints, references, tmp_path):
    """A trace worked out by hand: every expert pinned (the draft is the model itself), k = 2, eight
    new tokens t0..t7 at most, and a stop token that first appears as t4.

    round 1: prefill -> t0                                    drafted 0, accepted 0
    round 2: drafts t1 t2 (room min(2, 8-1-1)), both accepted, bonus t3    drafted 2, accepted 2
    round 3: drafts t4 t5, both accepted, but t4 stops the request: t4 only  drafted 2, accepted 1
    => 3 rounds, 2 with a draft, 4 drafted, 3 accepted (and emitted), 5 tokens; no transfer during
    the run; every expert moved once, before it (pinning).
    """
    path = checkpoints[("mixtral", "per_expert")]
    resident = Engine(EngineConfig(model=path, max_batch_size=1))
    free = {tuple(p): resident.generate([p], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
            for p in references["mixtral"][0]}
    prompt, t = next((list(p), t) for p, t in free.items() if t[4] not in t[:4])
    profile = record_profile(resident, [prompt], max_new_tokens=2)
    profile.save(tmp_path / "profile.json")
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=2, cache_budget=1.0, pinned_fraction=1.0,
                            profile=tmp_path / "profile.json")
    engine = Engine(EngineConfig(model=path, max_batch_size=1, decoder=decoder))
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(t[4],), ignore_eos=True)
    tokens, outputs = rounds(engine, [prompt], params)
    assert tokens == [t[:5]]
    assert [(o.new_token_ids, o.drafted, o.accepted) for o in outputs] == [(t[:1], 0, 0), (t[1:4], 2, 2), (t[4:5], 2, 1)]
    every_expert = 3 * 4 * (3 * 48 * 32 * 4)  # 3 layers x 4 experts x (gate, up, down: 3 x I x H fp32 values)
    expected = {
        "generated_tokens": 5, "tokens_per_s": 5.0, "time_per_output_token_ms": 200.0,  # over 1 s
        "rounds": 3, "draft_rounds": 2, "drafted_tokens": 4, "accepted_tokens": 3,
        "acceptance_rate": 0.75, "mean_accepted_per_round": 1.5,
        "expert_bytes_moved": 0, "expert_bytes_per_token": 0.0, "fetch_requests": 0, "fetch_requests_per_token": 0.0,
        "prefetched": 0, "misses": 0, "stall_s": 0.0, "cache_hit_rate": 1.0,
        "prediction_precision": 1.0, "prediction_recall": 1.0,  # the draft routes exactly as verification does
        "startup_bytes_moved": every_expert, "cache_peak_bytes": every_expert, "shadow_bytes": 0, "staged_peak_bytes": 0,
    }
    m = summarize(engine, 5, 1.0)
    assert {name: m[name] for name in expected} == expected


def test_profiling_an_offloaded_engine_keeps_its_prefetch_and_draft_routing(checkpoints, references):
    prompts, refs = references["mixtral"]
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=2, cache_budget=0.25)
    engine = Engine(EngineConfig(model=checkpoints[("mixtral", "per_expert")], max_batch_size=4, decoder=decoder))
    profile = record_profile(engine, prompts, max_new_tokens=4)
    assert all(sum(row) > 0 for row in profile.counts.values())
    assert engine.runtime.counters.prefetched > 0  # drafting predicted and prefetched while profiled
    engine.runtime.counters = FetchCounters()
    tokens = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))]
    assert tokens == refs
    assert engine.runtime.counters.prefetched > 0 and engine.runtime.counters.predicted_total > 0


@pytest.mark.parametrize("new_tokens", [8, 10])  # rounds of 1 + 5 + 5 tokens: the last starts 2 or 4 short of the end
def test_specmoe_serves_a_request_that_fills_max_model_len(checkpoints, new_tokens):
    """Specmoe accepts what the other modes accept: a draft never runs past the tokens still to
    come, so every position written (draft scratch included) stays below max_model_len (the KV
    cache refuses a write beyond it)."""
    path = checkpoints[("mixtral", "per_expert")]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompts = [list(range(3, 35 - new_tokens)), [5, 6]]  # the first fills max_model_len = 32
    refs = [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=2, max_model_len=32)).generate(prompts, params)]
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=4, cache_budget=1.0)  # k = k_max
    engine = Engine(EngineConfig(model=path, max_batch_size=2, max_model_len=32, decoder=decoder))
    tokens, outputs = rounds(engine, prompts, params)
    assert tokens == refs
    assert sum(o.drafted for o in outputs) > 0
    too_long = len(prompts[0]) + 1
    with pytest.raises(ValueError, match=rf"prompt \({too_long} tokens\) \+ max_new_tokens \({new_tokens}\) exceeds max_model_len \(32\)"):
        engine.add_request(list(range(3, 3 + too_long)), params)


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
