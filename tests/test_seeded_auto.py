"""Seeded sampling is reproducible with k = auto: every token is the Gumbel-max draw of its
own position's distribution with noise keyed by (seed, position), so neither k, nor the
controller's timings, nor the expert link, nor the mode changes the output; it equals k = 0's.

The draft and verification share each position's noise (drafter-invariant speculative
sampling): a chi-square test checks that the emitted tokens still follow the target
distribution with a draft that is often wrong.
"""

from __future__ import annotations

import random

import pytest
import torch

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.link import EmulatedLink, LinkConfig
from specmoe.offload import checkpoint_fetcher
from specmoe.sampling import SamplingParams, keyed_choice, position_noise, probabilities
from specmoe.speculative import accept_sampled, pad_drafts
from test_speculative_sampling import (PARAMS, PROMPT, SAMPLES, VOCAB, DraftBias, chi_square_against_the_target,  # noqa: F401
                                      chi_square_bound, peaked_model)

PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nWe are"]
SEEDED = SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


def run(model, decoder: DecoderConfig, timing_seed: int | None = None, link: LinkConfig | None = None):
    """Generate PROMPTS; with ``timing_seed`` the controller learns from draft and verify times
    scaled by random factors (another machine, another load). -> (tokens, k of every round)."""
    fetch = EmulatedLink(checkpoint_fetcher(model), link) if link is not None and decoder.mode != "resident" else None
    engine = Engine(EngineConfig(model=model, max_batch_size=2, decoder=decoder), fetch=fetch)
    ks = []
    choose, update = engine.controller.choose, engine.controller.update
    engine.controller.choose = lambda: ks.append(choose()) or ks[-1]
    if timing_seed is not None:
        rng = random.Random(timing_seed)

        def skewed(k, drafted, accepted, draft_s, verify_s):
            update(k, drafted, accepted, draft_s * rng.uniform(0.05, 20), verify_s * rng.uniform(0.05, 20))

        engine.controller.update = skewed
    tokens = [c.token_ids for c in engine.generate(PROMPTS, SEEDED)]
    if fetch is not None:
        fetch.close()
    return tokens, ks


def test_seeded_sampling_with_k_auto_is_the_same_whatever_the_timings_and_equals_k_0(shipped_model):
    auto = DecoderConfig(mode="specmoe", draft_policy="shadow", k="auto", k_max=4)
    runs = [run(shipped_model, auto, timing_seed=s) for s in (1, 2, 3)]
    runs.append(run(shipped_model, auto, link=LinkConfig(gbps=0.05, latency_us=200)))  # experts late: drafts on the shadow
    assert len({tuple(ks) for _, ks in runs}) > 1  # the controller really chose differently
    assert any(k > 0 for _, ks in runs for k in ks)  # and speculated
    plain, ks = run(shipped_model, DecoderConfig(mode="specmoe", k=0))
    assert set(ks) == {0}
    resident, _ = run(shipped_model, DecoderConfig(mode="resident"))
    assert all(tokens == plain for tokens, _ in runs)
    assert plain == resident
    assert len(set(plain[0])) > 5  # it really samples


def test_a_seeded_request_resumed_from_its_committed_tokens_continues_identically(shipped_model):
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=2, decoder=DecoderConfig(mode="specmoe", k=3)))
    full = engine.generate([PROMPTS[0]], SEEDED)[0]
    head = full.token_ids[:13]
    resumed = engine.generate([full.prompt_token_ids + head], SamplingParams(**{**SEEDED.__dict__, "max_new_tokens": 27}))[0]
    assert head + resumed.token_ids == full.token_ids


def test_position_noise_depends_on_seed_and_position_only():
    a = position_noise(7, 30, 100)
    assert torch.equal(a, position_noise(7, 30, 100))
    assert not torch.equal(a, position_noise(7, 31, 100)) and not torch.equal(a, position_noise(8, 30, 100))
    assert a.shape == (100,) and a.dtype == torch.float64 and torch.isfinite(a).all()


def test_keyed_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.5, 0.0, 0.25, 0.15])
    n = 20000
    draws = torch.stack([keyed_choice(probs, position_noise(3, m, 5)) for m in range(n)])
    freq = torch.bincount(draws, minlength=5).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * se), freq  # 5 standard errors: a false failure < 1e-5
    assert freq[2] == 0


def test_the_coupled_rule_accepts_exactly_where_draft_and_target_draws_agree():
    params = SamplingParams(temperature=1.0, seed=5)
    target = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))  # [1, k+1, V]
    noise = torch.stack([position_noise(5, 10 + j, 8) for j in range(4)])  # [k+1, V]
    want = keyed_choice(probabilities(target[0], params), noise).tolist()  # the target's own draws
    for draft, accepted in ((want[:3], 3), (want[:1] + [(want[1] + 1) % 8, want[2]], 1), ([(want[0] + 1) % 8] + want[1:3], 0)):
        v = accept_sampled(pad_drafts([draft]), torch.full((1, 3, 8), 1 / 8), target, [params], [None], [noise])
        assert (v.accepted, v.bonus) == ([accepted], [want[accepted]])


def test_seeded_speculative_sampling_keeps_the_target_distribution_with_a_draft_that_is_often_wrong(peaked_model):  # noqa: F811
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=3, cache_budget=1.0)
    engine = Engine(EngineConfig(model=peaked_model, max_batch_size=100, decoder=decoder))
    bias = 3.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    engine.model.lm_head = DraftBias(engine.model.lm_head, engine.runtime, bias)
    ids = [engine.add_request(PROMPT, SamplingParams(**PARAMS, seed=i)) for i in range(SAMPLES)]
    got, accepted, trials = {i: [] for i in ids}, 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            accepted += out.accepted
            trials += out.accepted + (out.accepted < out.drafted)
    samples = torch.tensor([got[i] for i in ids])  # [S, 4]
    assert trials > SAMPLES and 0.2 <= accepted / trials <= 0.5  # the draft is often wrong

    stat, df = chi_square_against_the_target(peaked_model, samples)
    assert df >= 8
    assert stat < chi_square_bound(df), (stat, df)
