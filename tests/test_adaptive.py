"""k = auto: the cost model of a round, the link estimate, and the controller in a real engine.

Hand-computed numbers check the model; the shipped model checks that the controller turns
speculation off when a draft step is slow and transfers are free, and that it speculates far
ahead when transfers dominate; every draft policy runs k = k_max = 8 exactly.
"""

from __future__ import annotations

import time

import pytest

from specmoe.adaptive import ExpertTraffic, LinkEstimate, RoundTraffic, SpeculationController
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.link import EmulatedLink, LinkConfig
from specmoe.offload import checkpoint_fetcher
from specmoe.sampling import SamplingParams

PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nWe are"]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


def hand_controller(**kwargs) -> SpeculationController:
    """M = 10 experts not resident, q = 0.1, 1000 bytes each at 1 us per byte (1 ms an expert),
    0.5 ms latency, 2 layers; C(0) = 10 ms, a draft step 4 ms, miss share 0.2, B = 1."""
    ctl = SpeculationController(traffic=ExpertTraffic(1000, 10, 2, 0.1), **{"k_max": 8} | kwargs)
    ctl.link = LinkEstimate(seconds_per_byte=1e-6, latency_s=5e-4)
    ctl.compute_s, ctl.draft_step_s, ctl.miss_share = {0: 0.010}, 0.004, 0.2
    return ctl


def test_expected_tokens_per_round():
    ctl = SpeculationController(acceptance=0.5)
    assert [ctl.expected_tokens(k) for k in (0, 1, 2)] == pytest.approx([1.0, 1.5, 1.75])


def test_acceptance_by_hand():
    ctl = SpeculationController()  # prior 0.8, counted as one draft token; counts kept 0.9 a round
    ctl.update(4, [4, 4], [4, 1], 0.1, 0.1)  # 5 accepted of 6 trials (4 + one stop after 1)
    assert ctl.acceptance == pytest.approx((5 + 0.8) / (6 + 1))
    ctl.update(3, [3], [0], 0.1, 0.1)  # decayed counts 4.5 of 5.4, plus 0 of 1
    assert ctl.acceptance == pytest.approx((4.5 + 0.8) / (6.4 + 1))


def test_round_time_by_hand():
    ctl = hand_controller()
    # k = 0: f = 10 (1 - 0.9) = 1 expert, all stalled: 10 + 1 + 0.5 ms
    assert ctl.round_s(0) == pytest.approx(0.0115)
    # k = 2: n = 3, f = 10 (1 - 0.9^3) = 2.71, missed 0.542; draft 3 x 4 = 12 ms hides the
    # predicted 2.168 + 0.5 ms; C(2) = 10 (1 + 0.25 x 2) = 15 ms; the misses 0.542 + 0.271 ms
    assert ctl.round_s(2) == pytest.approx(0.012 + 0.015 + 0.000542 + 0.000271)
    # deferred migration: the predicted transfers start when the draft ends
    assert hand_controller(overlap=False).round_s(2) == pytest.approx(0.027813 + 0.002168 + 0.0005)
    # measured C at 0 and 4: C(2) is interpolated, C(6) extrapolated
    ctl.compute_s = {0: 0.010, 4: 0.018}
    assert (ctl.compute_cost(2), ctl.compute_cost(6)) == pytest.approx((0.014, 0.022))


def test_link_estimate_recovers_a_fifo_link():
    # three 1000-byte transfers requested at once on a link of 1 us per byte and 1 ms latency
    rounds = [[(t, t + 0.002, 1000), (t, t + 0.003, 1000), (t, t + 0.004, 1000)] for t in range(40)]
    exact = LinkEstimate(seconds_per_byte=1e-6, latency_s=0.001, smoothing=1.0)
    exact.observe(rounds[0])
    assert (exact.seconds_per_byte, exact.latency_s) == pytest.approx((1e-6, 0.001))
    learned = LinkEstimate(smoothing=0.5)  # no prior: converges to the same figures
    for deliveries in rounds:
        learned.observe(deliveries)
    assert (learned.seconds_per_byte, learned.latency_s) == pytest.approx((1e-6, 0.001), rel=1e-3)


def test_need_is_fitted_per_k_from_the_experts_rounds_moved():
    ctl = hand_controller()
    ctl.observe(RoundTraffic(positions=2, fetched=5, missed=5, stall_s=0.004))  # 5 of M = 10 over 2 positions
    ctl.update(0, [0, 0], [0, 0], 0.0, 0.014)
    assert ctl.need[0] == pytest.approx(1 - 0.5 ** 0.5)
    assert ctl.compute_s[0] == pytest.approx(0.8 * 0.010 + 0.2 * 0.010)  # verify less its stall
    assert ctl.sequences == 2
    assert ctl.need_at(3) == ctl.need[0]  # unmeasured k: the nearest measured k below
    ctl.observe(RoundTraffic(positions=8, fetched=6, missed=1, stall_s=0.0, prefill=True))
    ctl.update(3, [3, 3], [3, 3], 0.02, 0.02)
    assert 3 not in ctl.need and 3 not in ctl.compute_s  # a prefill round teaches acceptance only
    ctl.observe(RoundTraffic(positions=8, fetched=6, missed=3, stall_s=0.0))  # 6 of 10 over 8 positions
    ctl.update(3, [3, 3], [3, 3], 0.02, 0.02)
    assert ctl.need[3] == pytest.approx(1 - 0.4 ** (1 / 8)) and ctl.need[0] == pytest.approx(1 - 0.5 ** 0.5)
    assert (ctl.need_at(2), ctl.need_at(5)) == (ctl.need[0], ctl.need[3])
    assert ctl.miss_share == pytest.approx(0.8 * 0.2 + 0.2 * 0.5)
    assert ctl.draft_step_s == pytest.approx(0.8 * 0.004 + 0.2 * 0.02 / 4)  # the round took k + 1 draft steps


def test_plain_decoding_wins_when_drafting_does_not_pay():
    ctl = SpeculationController(explore_every=1000)
    assert ctl.choose() == 0  # plain decoding first: it measures C(0)
    for _ in range(30):  # a draft step as slow as a round and nothing accepted
        ctl.update(0, [0, 0], [0, 0], draft_s=0.0, verify_s=1.0)
        ctl.update(4, [4, 4], [0, 0], draft_s=5.0, verify_s=1.2)
    assert ctl.choose() == 0


def test_speculation_when_drafts_are_cheap_and_accepted():
    ctl = SpeculationController(k_max=4, explore_every=1000)
    for _ in range(30):
        ctl.update(4, [4, 4], [4, 3], draft_s=0.5, verify_s=1.1)
        ctl.update(0, [0, 0], [0, 0], draft_s=0.0, verify_s=1.0)
    assert ctl.choose() == 4
    assert ctl.acceptance > 0.8


def test_large_k_when_transfers_dominate():
    ctl = hand_controller(explore_every=1000, acceptance=0.95)
    ctl.draft_step_s = 0.010  # a draft step costs what a plain round computes
    ctl.link.seconds_per_byte = 64e-6  # an expert takes 64 ms
    assert ctl.choose() == 8
    ctl.link.seconds_per_byte = 0.0  # the same round with free transfers: drafting does not pay
    assert ctl.choose() == 0
    wide = hand_controller(explore_every=1000, acceptance=0.95, k_max=16)  # the default k_max
    wide.draft_step_s, wide.link.seconds_per_byte = 0.010, 64e-6
    assert 8 < wide.choose() <= 16  # a round's bytes barely grow with k: rounds as long as acceptance allows


def test_exploration_is_bounded_and_plain_decoding_tries_k_1():
    ctl = hand_controller(explore_every=4)
    ctl.link.seconds_per_byte = 0.0
    assert [ctl.choose() for _ in range(12)] == [0, 0, 0, 1] + [0] * 7 + [1]  # after 4, then 8 rounds
    ctl.link.seconds_per_byte, ctl.acceptance = 64e-6, 0.95  # the choice changes: explore 4 rounds on
    assert [ctl.choose() for _ in range(5)] == [8, 8, 8, 7, 8]


def test_fixed_k_is_respected_and_validated():
    assert SpeculationController(k_max=4, fixed_k=2).choose() == 2
    with pytest.raises(ValueError, match="k must be in"):
        SpeculationController(k_max=2, fixed_k=3)
    with pytest.raises(ValueError, match="explore_every must be an integer >= 2"):
        SpeculationController(explore_every=1)
    assert DecoderConfig().k_max == SpeculationController().k_max == 16


def generate(model, decoder: DecoderConfig, fetch=None, slow_draft_s: float = 0.0):
    """Greedy PROMPTS -> (tokens, the k of every round)."""
    engine = Engine(EngineConfig(model=model, max_batch_size=len(PROMPTS), decoder=decoder), fetch=fetch)
    ks, choose, draft = [], engine.controller.choose, engine._draft
    engine.controller.choose = lambda: ks.append(choose()) or ks[-1]

    def slow(seqs, k):  # every draft step costs slow_draft_s more
        draft(seqs, k)
        time.sleep(slow_draft_s * (k + 1) if k else 0.0)

    engine._draft = slow
    tokens = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    if fetch is not None:
        fetch.close()
    return tokens, ks


@pytest.fixture(scope="module")
def resident_tokens(shipped_model):
    return generate(shipped_model, DecoderConfig(mode="resident"))[0]


def test_auto_turns_speculation_off_with_a_slow_draft_and_free_transfers(shipped_model, resident_tokens):
    # every expert fits the cache: transfers are free; a draft step costs 20 ms more than a round
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k="auto", cache_budget=1.0)
    tokens, ks = generate(shipped_model, decoder, slow_draft_s=0.02)
    assert tokens == resident_tokens
    assert set(ks) <= {0, 1} and ks.count(1) <= 2, ks  # k = 1 only when exploring, every 16th round


def test_auto_speculates_far_ahead_when_transfers_dominate(shipped_model, resident_tokens):
    # 10 MB/s: one expert (192 KiB) takes ~20 ms, ten times a round's compute; int8 drafts are accepted
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", shadow_bits=8, k="auto", eviction="lru")
    tokens, ks = generate(shipped_model, decoder, EmulatedLink(checkpoint_fetcher(shipped_model), LinkConfig(gbps=0.01)))
    assert tokens == resident_tokens
    speculative = ks[2:]  # after the prefill and one plain round that measures C(0)
    assert speculative and sorted(speculative)[len(speculative) // 2] >= 6, ks


@pytest.mark.parametrize("policy", ["resident", "shadow", "hot"])
@pytest.mark.parametrize("k", [8, "auto"])
def test_k_max_8_is_exact_with_every_draft_policy(shipped_model, resident_tokens, policy, k):
    decoder = DecoderConfig(mode="specmoe", draft_policy=policy, k=k, k_max=8)
    link = EmulatedLink(checkpoint_fetcher(shipped_model), LinkConfig(gbps=0.01)) if k == "auto" else None
    tokens, ks = generate(shipped_model, decoder, link)
    assert tokens == resident_tokens
    assert max(ks) == 8 if k == 8 else max(ks) > 0, ks  # auto speculates behind the slow link


def test_k_8_fills_max_model_len(checkpoints):
    """Drafts of 8 stay within the tokens still to come and below max_model_len (the KV cache
    refuses a write beyond it)."""
    path = checkpoints[("mixtral", "per_expert")]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [list(range(3, 23)), [5, 6]]  # the first fills max_model_len = 32
    refs = [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=2, max_model_len=32)).generate(prompts, params)]
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=8, cache_budget=1.0)
    engine = Engine(EngineConfig(model=path, max_batch_size=2, max_model_len=32, decoder=decoder))
    assert [o.token_ids for o in engine.generate(prompts, params)] == refs
    assert engine.counters.drafted_tokens >= 8
