"""Speculative sampling through the whole engine keeps the target distribution.

A small-vocabulary model (its output head scaled so that temperature 1 and top-p 0.9 leave a few
likely tokens) samples 4 tokens per request, the last 3 in speculative rounds whose draft is
deliberately off: in draft routing a fixed bias is added to the logits, so the draft is rejected
about half the time and the residual distribution decides many tokens. For every request and
position the target distribution given that request's own prefix is computed by transformers;
the expected count of each token is the sum of those probabilities over requests, and a
chi-square test compares it with the observed counts (a martingale: each request's token is
drawn from its conditional, whatever the earlier tokens were).
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import save_random_checkpoint
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams, probabilities

VOCAB = 16
SAMPLES = 800
PROMPT = [3, 9, 4, 12, 7]
PARAMS = dict(max_new_tokens=4, temperature=1.0, top_p=0.9, ignore_eos=True)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    path = save_random_checkpoint("mixtral", tmp_path_factory.mktemp("peaked") / "m", seed=2, vocab_size=VOCAB)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 20  # logits of a few units: about 5 tokens within top-p 0.9
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


class DraftBias(nn.Module):
    """The output head, plus ``bias`` [V] while the engine drafts: a draft that is often wrong."""

    def __init__(self, head: nn.Module, runtime, bias: torch.Tensor):
        super().__init__()
        self.head, self.runtime, self.bias = head, runtime, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)  # [R, V]
        return logits + self.bias if self.runtime.phase == "draft" else logits


def chi_square_against_the_target(model_dir, samples: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``samples`` [S, 4] (after ``PROMPT``) against the distribution
    transformers gives each position, per position (expected counts under 5 pooled); and its df."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.cat([torch.tensor(PROMPT).expand(len(samples), -1), samples], dim=1)  # [S, P+4]
    with torch.inference_mode():
        logits = hf(ids).logits[:, len(PROMPT) - 1 : -1]  # [S, 4, V]: the target for each new token
    target = probabilities(logits, SamplingParams(**PARAMS))  # [S, 4, V]
    stat, df = 0.0, 0
    for j in range(samples.shape[1]):
        observed = torch.bincount(samples[:, j], minlength=VOCAB).double()  # [V]
        expected = target[:, j].double().sum(dim=0)  # [V]
        big = expected >= 5
        observed = torch.cat([observed[big], observed[~big].sum()[None]])
        expected = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = expected > 0
        stat += float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        df += int(keep.sum()) - 1
    return stat, df


def chi_square_bound(df: int, z: float = 3.72) -> float:
    """The chi-square quantile with ``df`` degrees of freedom at one-sided normal quantile ``z``
    (3.72: p = 1e-4), by the Wilson-Hilferty approximation."""
    c = 2 / (9 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def test_engine_samples_the_target_distribution_with_a_draft_that_is_often_rejected(peaked_model):
    decoder = DecoderConfig(mode="specmoe", draft_policy="resident", k=3, cache_budget=1.0)
    engine = Engine(EngineConfig(model=peaked_model, max_batch_size=100, decoder=decoder))
    bias = 3.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    engine.model.lm_head = DraftBias(engine.model.lm_head, engine.runtime, bias)
    # unseeded: the rejection rule (a seeded request takes the drafter-invariant rule, tests/test_seeded_auto.py)
    ids = [engine.add_request(PROMPT, SamplingParams(**PARAMS)) for _ in range(SAMPLES)]
    got, accepted, trials = {i: [] for i in ids}, 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            accepted += out.accepted
            trials += out.accepted + (out.accepted < out.drafted)  # each accepted token, and the rejected one
    samples = torch.tensor([got[i] for i in ids])  # [S, 4]
    assert trials > SAMPLES and 0.25 <= accepted / trials <= 0.65  # the draft is often rejected (about 0.36 of its tokens accepted)

    stat, df = chi_square_against_the_target(peaked_model, samples)
    assert df >= 8  # enough likely tokens per position for the test to see a wrong distribution
    assert stat < chi_square_bound(df), (stat, df)
