"""The engine: continuous batching, stopping, bad requests, bf16."""

from __future__ import annotations

import pytest
import torch

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]


@pytest.fixture(scope="module")
def engine(checkpoints):
    return Engine(EngineConfig(model=checkpoints[("mixtral", "per_expert")], max_batch_size=3, max_model_len=64))


def solo(engine, prompt, params):
    return engine.generate([prompt], params)[0].token_ids


def test_requests_joining_mid_stream_match_running_alone(engine):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [solo(engine, p, params) for p in PROMPTS]
    # two requests start, two more arrive while they decode; only 3 slots, so one queues
    ids = [engine.add_request(PROMPTS[0], params), engine.add_request(PROMPTS[1], params)]
    got = {i: [] for i in range(4)}
    names = {}
    for step in range(100):
        if step == 3:
            ids += [engine.add_request(PROMPTS[2], params), engine.add_request(PROMPTS[3], params)]
        names = {rid: i for i, rid in enumerate(ids)}
        for out in engine.step():
            got[names[out.request_id]] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert [got[i] for i in range(4)] == alone


def test_sampled_requests_are_reproducible_with_a_seed(engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
    a = engine.generate(PROMPTS[:2], params)
    b = engine.generate(PROMPTS[:2], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_stop_tokens_and_finish_reasons(engine):
    free = solo(engine, PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
    stop_at = free[3]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, stop_token_ids=(stop_at,), ignore_eos=True))[0]
    assert out.token_ids == free[: free.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    out = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (3, "length")


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([5, 9999], SamplingParams(), r"outside the vocabulary \[0, 128\)"),
        ([5] * 60, SamplingParams(max_new_tokens=10), r"exceeds max_model_len \(64\)"),
        ("text", SamplingParams(), "no tokenizer"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()
    assert len(solo(engine, PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True))) == 4


def test_abort_frees_the_slot(engine):
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort(rid)
    assert not engine.has_unfinished()
    assert engine.cache.num_free() == engine.cache.num_slots


def test_bad_engine_config_is_named():
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="allowed: resident, ondemand, pregate, specmoe"):
        DecoderConfig(mode="nope")
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, k_max=16\] or 'auto'"):
        DecoderConfig(k=17)
    with pytest.raises(ValueError, match="cache_budget"):
        DecoderConfig(cache_budget=0)
    with pytest.raises(ValueError, match="draft policy"):
        DecoderConfig(draft_policy="oracle")


def test_bf16_logits_close_to_fp32_within_bf16_tolerance(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    logits = {}
    for dtype in ("fp32", "bf16"):
        eng = Engine(EngineConfig(model=path, dtype=dtype, max_batch_size=1))
        seq_batch = eng.cache.batch([eng.cache.allocate()], [len(PROMPTS[0])])
        with torch.inference_mode():
            logits[dtype] = eng.model(torch.tensor(PROMPTS[0]), seq_batch, eng.cache)
    assert logits["bf16"].dtype == torch.float32
    torch.testing.assert_close(logits["bf16"], logits["fp32"], atol=3e-2, rtol=0)
