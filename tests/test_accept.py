"""Accept rules on hand-built logits, and rejection sampling's exactness in distribution."""

from __future__ import annotations

import torch

from specmoe.sampling import SamplingParams
from specmoe.speculative import accept_greedy, accept_sampled, pad_drafts

V = 6


def logits_for(argmaxes: list[list[int]]) -> torch.Tensor:
    """[B, k+1, V] logits whose argmax at each position is the given token."""
    out = torch.zeros(len(argmaxes), len(argmaxes[0]), V)
    for b, row in enumerate(argmaxes):
        for j, t in enumerate(row):
            out[b, j, t] = 5.0
    return out


def test_perfect_match_accepts_everything_and_adds_the_bonus():
    v = accept_greedy(pad_drafts([[1, 2, 3]]), logits_for([[1, 2, 3, 4]]))
    assert (v.accepted, v.bonus) == ([3], [4])
    assert v.tokens([[1, 2, 3]]) == [[1, 2, 3, 4]]


def test_early_mismatch_keeps_the_prefix_and_the_target_token():
    v = accept_greedy(pad_drafts([[1, 5, 3]]), logits_for([[1, 2, 3, 4]]))
    assert (v.accepted, v.bonus) == ([1], [2])
    v = accept_greedy(pad_drafts([[0, 2, 3]]), logits_for([[1, 2, 3, 4]]))
    assert (v.accepted, v.bonus) == ([0], [1])  # a match after a mismatch does not count


def test_empty_draft_is_plain_decoding():
    v = accept_greedy(pad_drafts([[], []]), logits_for([[3], [5]]))
    assert (v.accepted, v.bonus) == ([0, 0], [3, 5])


def test_per_sequence_accept_counts_and_ragged_drafts():
    drafts = [[1, 2, 3], [1, 1, 1], [4], [2, 2]]
    target = logits_for([[1, 2, 3, 0], [1, 2, 0, 0], [4, 5, 0, 0], [2, 2, 1, 0]])
    v = accept_greedy(pad_drafts(drafts), target)
    assert v.accepted == [3, 1, 1, 2]
    assert v.bonus == [0, 2, 5, 1]
    assert v.tokens(drafts) == [[1, 2, 3, 0], [1, 2], [4, 5], [2, 2, 1]]


def test_sampled_rows_with_temperature_zero_follow_the_greedy_rule():
    drafts = [[1, 2], [1, 2]]
    target = logits_for([[1, 2, 3], [1, 4, 3]])
    params = [SamplingParams(), SamplingParams()]
    v = accept_sampled(pad_drafts(drafts), torch.full((2, 2, V), 1 / V), target, params, [None, None])
    assert (v.accepted, v.bonus) == ([2, 1], [3, 4])


def test_rejection_sampling_is_seeded_deterministic():
    target = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(1))
    q = torch.softmax(torch.randn(3, 3, V, generator=torch.Generator().manual_seed(2)), -1)
    drafts = pad_drafts([[0, 1, 2], [3, 4, 5], [1, 1, 1]])
    params = [SamplingParams(temperature=1.0, seed=s) for s in (5, 6, 7)]
    runs = [accept_sampled(drafts, q, target, params, [p.generator() for p in params]) for _ in range(2)]
    assert runs[0] == runs[1]


def test_rejection_sampling_preserves_the_target_distribution():
    """The first emitted token is distributed as the target p, whatever the draft q is."""
    p_logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0])
    p = torch.softmax(p_logits, 0)
    q = torch.tensor([0.05, 0.4, 0.3, 0.05, 0.15, 0.05])  # a bad draft on purpose
    params = SamplingParams(temperature=1.0, seed=2024)
    gen = params.generator()
    draw_gen = torch.Generator().manual_seed(99)
    n = 20000
    counts = torch.zeros(V)
    target_logits = torch.stack([p_logits, p_logits])[None]  # [1, 2, V]
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=draw_gen))
        v = accept_sampled(pad_drafts([[d]]), q[None, None], target_logits, [params], [gen])
        counts[d if v.accepted[0] == 1 else v.bonus[0]] += 1
    freq = counts / n
    se = (p * (1 - p) / n).sqrt()
    assert torch.all((freq - p).abs() < 5 * se), (freq, p)
