"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, seed).

A seeded request draws every token by the Gumbel-max rule with noise keyed by (seed,
position): the token at position m is ``argmax(log p_m + g(seed, m))``, where p_m is the
distribution it is drawn from and g is standard Gumbel noise [V] that depends on nothing
else. That is an exact sample of p_m, and it does not depend on how the tokens were reached:
speculation (a draft takes the same rule on its own distribution and verification keeps it
where both agree, ``specmoe.speculative.accept_sampled``), k, timing, batch, mode or decoder
all give the same tokens. Unseeded requests draw from a per-request generator.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def keyed(self) -> bool:
        """Sampled with noise keyed by (seed, position): reproducible whatever the schedule."""
        return not self.greedy and self.seed is not None

    def generator(self) -> torch.Generator | None:
        """A generator for this request: seeded when ``seed`` is set, random otherwise."""
        if self.greedy:
            return None
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from: logits [..., V] -> probs [..., V] (float32).

    Temperature first, then top-k, then top-p (the order transformers applies them).
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - params.top_p
        drop_sorted[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(dim=-1)


def position_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise [V] (float64) for one position of a seeded request: a function of
    (seed, position) alone."""
    key = hashlib.blake2b(f"{seed}/{position}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    u = torch.rand(vocab, generator=gen, dtype=torch.float64).clamp_(min=torch.finfo(torch.float64).tiny)  # [V]
    return -torch.log(-torch.log(u))


def keyed_choice(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max draw: probs [..., V], noise [..., V] -> token ids [...]; exact for p."""
    return (probs.double().log() + noise).argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    probs_out: dict[int, torch.Tensor] | None = None,
    noise: list[torch.Tensor | None] | None = None,
) -> list[int]:
    """One token per row: logits [B, V] -> B token ids. ``probs_out`` receives, per sampled
    row, the distribution [V] its token was drawn from (a draft keeps it for acceptance).
    A row with ``noise[row]`` (its position's ``position_noise``) takes the Gumbel-max draw;
    other sampled rows draw from their generator."""
    tokens = logits.argmax(dim=-1)  # [B]
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            probs = probabilities(logits[row], p).cpu()  # [V]; sync: request generators live on the host
            g = noise[row] if noise is not None else None
            tokens[row] = keyed_choice(probs, g) if g is not None else torch.multinomial(probs, 1, generator=gen)[0]
            if probs_out is not None:
                probs_out[row] = probs
    return tokens.tolist()  # sync: the scheduler needs the tokens on the host
