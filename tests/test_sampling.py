"""Sampling: validation, filtering rules on hand-built logits, seeded determinism, distribution."""

from __future__ import annotations

import pytest
import torch

from specmoe.sampling import SamplingParams, probabilities, sample


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed="7"), "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [False, True, True, False, False]
    torch.testing.assert_close(probs[1:3], torch.softmax(torch.tensor([4.0, 3.0]), 0))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs_in.log()
    kept = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.75)) > 0
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.75 <= 0.8
    kept = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8)) > 0
    assert kept.tolist() == [True, True, False, False]
    kept = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.81)) > 0
    assert kept.tolist() == [True, True, True, False]
    kept = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.01)) > 0
    assert kept.tolist() == [True, False, False, False]


def test_temperature_scales_logits():
    logits = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=0.5)), torch.softmax(logits / 0.5, 0))


def test_seeded_sampling_is_deterministic():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    runs = [[sample(logits, params, [p.generator() for p in params]) for _ in range(1)] for _ in range(2)]
    assert runs[0] == runs[1]
    p = SamplingParams(temperature=1.0, seed=11)
    gen_a, gen_b = p.generator(), p.generator()
    seq_a = [sample(logits[:1], [p], [gen_a])[0] for _ in range(20)]
    seq_b = [sample(logits[:1], [p], [gen_b])[0] for _ in range(20)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1  # it really samples


def test_greedy_rows_take_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=0)]
    assert sample(logits, params, [p.generator() for p in params]) == [1, 0]


def test_sampled_frequencies_match_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    target = torch.softmax(logits, 0)
    p = SamplingParams(temperature=1.0, seed=123)
    gen = p.generator()
    n = 20000
    draws = [sample(logits[None], [p], [gen])[0] for _ in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / n
    # 5 standard errors on each cell: a false failure has probability < 1e-5
    se = (target * (1 - target) / n).sqrt()
    assert torch.all((freq - target).abs() < 5 * se), (freq, target)
