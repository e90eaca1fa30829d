"""Draft policies under a real link's timing, and what the metrics say about them.

An in-process source reads an expert in far less than a draft step, so a draft rarely needs
its policy: the experts it predicted have mostly arrived before it runs them. ``DelayedSource``
delivers on a
background thread after a delay, as a link does, so drafts run on the policy (shadow copies,
or resident experts only) while the exact experts are in flight.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from conftest import save_random_checkpoint
from deploy.cli import main as cli
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.layers import TopKRouter
from specmoe.metrics import summarize
from specmoe.offload import checkpoint_fetcher
from specmoe.quant import PackedInt4, pack_int4_for_cpu, quantize
from specmoe.sampling import SamplingParams

TEXTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nWe are", "KING"]
NEW_TOKENS = 24


class DelayedSource:
    """Experts read from the checkpoint when requested (on the caller's thread: no torch work on
    a second thread) and delivered by a timer thread ``delay_s`` later, like a link; never while
    ``runtime`` (when set) is drafting, so every draft runs before its predictions arrive, however
    slow the machine."""

    def __init__(self, model_dir, delay_s: float):
        self.read = checkpoint_fetcher(model_dir)
        self.delay_s = delay_s
        self.runtime = None

    def __call__(self, layer: int, experts: list[int]) -> dict[int, Future]:
        read = {e: f.result() for e, f in self.read(layer, experts).items()}
        futures = {e: Future() for e in experts}

        def deliver():
            if self.runtime is not None and self.runtime.phase == "draft":
                return later(self.delay_s / 4)
            for e in experts:
                futures[e].set_result(read[e])

        def later(seconds: float):
            timer = threading.Timer(seconds, deliver)
            timer.daemon = True
            timer.start()

        later(self.delay_s)
        return futures


class BlockingSource:
    """Experts read in the fetch call itself after ``delay_s`` (a slow in-process read, or a
    transport that asks its store for references): the caller is blocked, the futures are done.
    Counts the calls made while the engine's runtime was in its exact phase."""

    def __init__(self, model_dir, delay_s: float):
        self.read = checkpoint_fetcher(model_dir)
        self.delay_s = delay_s
        self.runtime = None
        self.exact_calls = 0

    def __call__(self, layer: int, experts: list[int]) -> dict[int, Future]:
        time.sleep(self.delay_s)
        if self.runtime is not None and self.runtime.phase == "exact":
            self.exact_calls += 1
        return self.read(layer, experts)


@pytest.fixture(scope="module")
def shipped_prompts(shipped_model):
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=len(TEXTS)))
    prompts = [engine.encode(t) for t in TEXTS]
    refs = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))]
    return prompts, refs


def generate(path, decoder, prompts, fetch=None, new_tokens=NEW_TOKENS):
    engine = Engine(EngineConfig(model=path, max_batch_size=len(prompts), decoder=decoder), fetch=fetch)
    if isinstance(fetch, DelayedSource):
        fetch.runtime = engine.runtime
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens))
    return [o.token_ids for o in outs], engine


def test_the_shadow_drafts_while_the_exact_experts_are_in_flight(shipped_model, shipped_prompts):
    """The draft runs on int4 copies (the exact experts have not arrived): a faithful copy keeps
    acceptance high (a copy with wrong weights falls far below), and the output stays exact."""
    prompts, refs = shipped_prompts
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, cache_budget=0.25)
    tokens, engine = generate(shipped_model, decoder, prompts, DelayedSource(shipped_model, 0.05))
    assert tokens == refs
    m = summarize(engine, sum(map(len, tokens)), 1.0)
    assert engine.runtime.counters.shadow_uses > 0
    assert m["drafted_tokens"] > 0 and m["acceptance_rate"] >= 0.7, m


def test_a_wrong_shadow_drafts_badly_and_the_output_stays_exact(shipped_model, shipped_prompts):
    """The draft really runs on the shadow while the exact experts are in flight: with a
    deliberately wrong shadow (each copy's down projection negated, packed like the real one)
    acceptance collapses, and verification, which never uses the shadow, keeps the output exact."""
    prompts, refs = shipped_prompts
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, cache_budget=0.25)
    source = DelayedSource(shipped_model, 0.05)
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=len(prompts), decoder=decoder), fetch=source)
    source.runtime = engine.runtime
    read = checkpoint_fetcher(shipped_model)
    for (layer, e), copies in engine.runtime.shadow.items():
        gate_up, down = (w.float() for w in read(layer, [e])[e].result())
        wrong = (quantize(gate_up, 4, 32), quantize(-down, 4, 32))
        engine.runtime.shadow[(layer, e)] = tuple(map(pack_int4_for_cpu, wrong)) if isinstance(copies[0], PackedInt4) else wrong
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outs] == refs
    m = summarize(engine, sum(len(o.token_ids) for o in outs), 1.0)
    assert engine.runtime.counters.shadow_uses > 0
    assert m["drafted_tokens"] > 0 and m["acceptance_rate"] <= 0.4, m


def test_the_resident_policy_drafts_with_a_small_budget(shipped_model, shipped_prompts):
    """Resident-only drafts on a quarter of the experts: every layer keeps a share of the cache,
    so drafts are accepted (no layer is left without experts, no 0/0 weights)."""
    prompts, refs = shipped_prompts
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=3, cache_budget=0.25)
    tokens, engine = generate(shipped_model, decoder, prompts, DelayedSource(shipped_model, 0.02))
    assert tokens == refs
    c = engine.counters
    assert c.drafted_tokens > 0 and c.accepted_tokens > 0, c
    assert all(engine.runtime.cache.resident(layer) for layer, _ in engine.model.moe_blocks())


def test_resident_policy_samples_with_temperature_from_the_command_line(capsys):
    """The command of the bug report: it crashed in torch.multinomial on NaN weights."""
    argv = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "16", "--mode", "specmoe", "--draft-policy",
            "resident", "--k", "3", "--cache-budget", "0.25", "--temperature", "1.0", "--seed", "0"]
    assert cli(argv) == 0
    out = capsys.readouterr()
    metrics = dict(line.split()[1:3] for line in out.err.splitlines() if line.startswith("[specmoe] ") and len(line.split()) == 3)
    assert int(metrics["generated_tokens"]) == 16 and out.out.strip()
    assert int(metrics["drafted_tokens"]) > 0


def test_no_resident_expert_means_no_routed_output_not_nan():
    router = TopKRouter(hidden_size=4, num_experts=6, top_k=2, norm_topk_prob=True, cast_weights=False, layer=0)
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))  # [N, E]
    none = torch.zeros(6, dtype=torch.bool)
    weights, _ = router.select(logits, none)
    assert torch.equal(weights, torch.zeros(5, 2))
    one = none.clone()
    one[3] = True
    weights, indices = router.select(logits, one)  # fewer allowed than k: the rest weigh 0
    assert torch.all(indices[:, 0] == 3) and torch.all(weights[:, 0] == 1) and torch.all(weights[:, 1] == 0)


@pytest.fixture(scope="module")
def odd_checkpoints(tmp_path_factory):
    """Widths that are not multiples of the default shadow group (32): hidden 80, expert width 48."""
    root = tmp_path_factory.mktemp("odd")
    return {
        "mixtral": save_random_checkpoint("mixtral", root / "mixtral", hidden_size=80, intermediate_size=48),
        "qwen3_moe": save_random_checkpoint("qwen3_moe", root / "qwen3_moe", hidden_size=80, moe_intermediate_size=48),
    }


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_default_shadow_serves_widths_that_are_not_multiples_of_its_group(family, odd_checkpoints):
    path = odd_checkpoints[family]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (7, 3)]
    refs, _ = generate(path, DecoderConfig(mode="resident"), prompts, new_tokens=12)
    decoder = DecoderConfig(mode="specmoe", k=2)  # the default draft policy and group size
    assert (decoder.draft_policy, decoder.shadow_group_size) == ("shadow", 32)
    tokens, engine = generate(path, decoder, prompts, DelayedSource(path, 0.02), new_tokens=12)
    assert tokens == refs
    assert engine.runtime.shadow_bytes > 0 and engine.runtime.counters.shadow_uses > 0
    assert engine.counters.accepted_tokens > 0
    read = checkpoint_fetcher(path)
    for (layer, e), copies in engine.runtime.shadow.items():  # each copy is its expert, to int4 precision
        for copy, exact in zip(copies, read(layer, [e])[e].result()):
            # [R, C]: at most half a step of its group, plus (a PackedInt4 copy: its scale in bf16) 8 values x 2^-8 of a step
            error = (copy.dequantize() - exact.float()).abs()
            assert error.shape == exact.shape and error.max() <= exact.abs().max() / 7 * (1 / 2 + 1 / 32) + 1e-6


def test_stall_counts_the_time_an_exact_pass_is_blocked_in_the_fetch_call(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    source = BlockingSource(path, 0.01)
    engine = Engine(EngineConfig(model=path, max_batch_size=2, decoder=DecoderConfig(mode="ondemand", cache_budget=0.25)),
                    fetch=source)
    source.runtime = engine.runtime
    outs = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    m = summarize(engine, sum(len(o.token_ids) for o in outs), 1.0)
    assert source.exact_calls > 0 and m["misses"] > 0
    assert source.exact_calls * 0.01 <= m["stall_s"] <= m["verify_s"]


def test_stall_counts_the_wait_for_a_delivery(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    decoder = DecoderConfig(mode="ondemand", cache_budget=0.25)
    _, engine = generate(path, decoder, [[5, 6, 7]], DelayedSource(path, 0.02), new_tokens=4)
    c = engine.runtime.counters
    assert c.misses > 0 and 0.02 <= c.stall_s <= engine.counters.verify_s


def test_requests_join_while_others_draft(checkpoints):
    """Continuous batching in specmoe mode: requests are admitted (and prefill) in the same verification
    pass in which running ones check their drafts (drafted on the few resident experts, so some are
    rejected and rolled back); every request gets exactly the tokens it gets alone."""
    path = checkpoints[("mixtral", "per_expert")]
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    resident = Engine(EngineConfig(model=path, max_batch_size=1))
    alone = [resident.generate([p], params)[0].token_ids for p in prompts]
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=3, cache_budget=0.25)
    source = DelayedSource(path, 0.01)
    engine = Engine(EngineConfig(model=path, max_batch_size=3, decoder=decoder), fetch=source)
    source.runtime = engine.runtime
    ids = [engine.add_request(p, params) for p in prompts[:2]]
    got, mixed = {}, 0
    for step in range(200):
        if step == 2:  # two more arrive while the first two draft; 3 slots, so the last one queues
            ids += [engine.add_request(p, params) for p in prompts[2:]]
        outputs = engine.step()
        for out in outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        drafting = any(o.drafted for o in outputs)
        prefilling = any(o.request_id in ids[2:] and len(got[o.request_id]) == len(o.new_token_ids) for o in outputs)
        mixed += drafting and prefilling
        if not engine.has_unfinished():
            break
    assert [got[i] for i in ids] == alone
    assert mixed >= 1  # request 3 prefilled in a round in which requests 1 and 2 checked their drafts
    c = engine.counters
    assert c.drafted_tokens > c.accepted_tokens > 0  # drafts were rejected and rolled back too


def test_draft_wait_counts_only_a_source_that_blocks_in_its_fetch_call(checkpoints):
    """A draft never awaits a delivery (DelayedSource delivers nothing while drafting, and drafts
    still finish); the only time a draft can lose to a source is inside its fetch call, counted
    as draft_wait_s."""
    path = checkpoints[("mixtral", "per_expert")]
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=2, cache_budget=0.25)
    _, engine = generate(path, decoder, [[5, 6, 7]], DelayedSource(path, 0.01), new_tokens=6)
    assert engine.counters.drafted_tokens > 0 and engine.runtime.counters.draft_wait_s < 0.05
    source = BlockingSource(path, 0.01)
    engine = Engine(EngineConfig(model=path, max_batch_size=1, decoder=decoder), fetch=source)
    source.runtime = engine.runtime
    engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))
    c = engine.runtime.counters
    assert engine.counters.drafted_tokens > 0 and c.draft_wait_s >= 0.01
