"""Routing profiles: how often each layer's router picks each expert on calibration prompts.

The decoder pins the hottest experts from a profile in its expert cache. A profile is a
small JSON file::

    {"format": "specmoe-routing-profile/1", "model_type": "mixtral", "num_layers": 4,
     "num_experts": 8, "tokens": 4096, "counts": {"0": [..8 ints..], ...}}

Routing skew, measured on one layer's pick counts (E experts):

- ``top_share(counts, 0.2)``: the share of routed token-slots taken by the busiest 20% of the
  experts (the descending Lorenz curve at 0.2, interpolated when 0.2 E is fractional): 0.2
  when every expert is picked equally often, 1.0 when one expert takes everything.
- ``gini(counts)``: the Gini coefficient normalised by its maximum (E - 1) / E: 0 balanced,
  1 one expert takes everything.

Shape letters: N tokens, K experts per token, E experts, T trials, B batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "specmoe-routing-profile/1"


@dataclass
class RoutingProfile:
    model_type: str
    num_experts: int
    counts: dict[int, list[int]] = field(default_factory=dict)  # layer -> picks per expert
    tokens: int = 0

    def add(self, layer: int, indices: torch.Tensor) -> None:
        # indices [N, K]
        picks = torch.bincount(indices.reshape(-1), minlength=self.num_experts).tolist()  # sync: profiling only
        row = self.counts.setdefault(layer, [0] * self.num_experts)
        self.counts[layer] = [a + b for a, b in zip(row, picks)]

    def share(self, layer: int) -> list[float]:
        row = self.counts.get(layer, [0] * self.num_experts)
        total = sum(row) or 1
        return [c / total for c in row]

    def skew(self, layer: int) -> float:
        """``top_share`` of the layer's picks: 0.2 balanced, 1.0 all to one expert."""
        return top_share(self.counts.get(layer, [0] * self.num_experts))

    def ranked(self) -> list[tuple[int, int]]:
        """Every (layer, expert), hottest first by its share of its layer's picks."""
        keys = [(layer, e) for layer in sorted(self.counts) for e in range(self.num_experts)]
        return sorted(keys, key=lambda k: (-self.share(k[0])[k[1]], k[0], k[1]))

    def save(self, path: str | Path) -> None:
        data = {
            "format": FORMAT,
            "model_type": self.model_type,
            "num_experts": self.num_experts,
            "tokens": self.tokens,
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
        }
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RoutingProfile:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a routing profile (format {data.get('format')!r}, expected {FORMAT!r})")
        counts = {int(k): list(v) for k, v in data["counts"].items()}
        return cls(data["model_type"], data["num_experts"], counts, data["tokens"])


def record_profile(engine, prompts: list[str | list[int]], max_new_tokens: int = 32) -> RoutingProfile:
    """Run ``prompts`` through ``engine`` (greedy) and count every exact routing decision.

    The counting hook sits beside the engine's own (an offloaded engine keeps prefetching and
    drafting while it is profiled, and afterwards); draft passes are not counted.
    """
    blocks = engine.model.moe_blocks()
    profile = RoutingProfile(engine.hf_config.model_type, blocks[0][1].experts.num_experts)
    runtime = engine.runtime

    def count(router, x, logits, weights, indices):
        if runtime is None or runtime.phase == "exact":
            profile.add(router.layer, indices)
        return logits, weights, indices

    for _, block in blocks:
        block.gate.add_hook(count)
    try:
        from specmoe.sampling import SamplingParams

        outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    finally:
        for _, block in blocks:
            block.gate.remove_hook(count)
    profile.tokens = sum(len(o.prompt_token_ids) + len(o.token_ids) for o in outs)
    return profile


def top_share(counts: list[int], fraction: float = 0.2) -> float:
    """The share of all picks taken by the busiest ``fraction`` of the experts (see the module docstring)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("no picks counted: top_share needs at least one routed token")
    ranked = sorted(counts, reverse=True)
    whole, part = divmod(fraction * len(ranked), 1)
    taken = sum(ranked[: int(whole)]) + (part * ranked[int(whole)] if int(whole) < len(ranked) else 0)
    return taken / total


def gini(counts: list[int]) -> float:
    """The Gini coefficient of the pick counts, normalised to [0, 1] (see the module docstring)."""
    n, total = len(counts), sum(counts)
    if n < 2 or total <= 0:
        raise ValueError(f"gini needs at least two experts and one pick, got {n} experts and {total} picks")
    ranked = sorted(counts)
    # G = sum_i (2i - n - 1) x_i / (n * total) over ascending x, i = 1..n; its maximum is (n - 1) / n
    g = sum((2 * i - n - 1) * x for i, x in enumerate(ranked, start=1)) / (n * total)
    return g * n / (n - 1)


def distinct_experts(indices: torch.Tensor, num_experts: int, batch: int, trials: int, gen: torch.Generator) -> float:
    """Mean number of distinct experts one layer needs for ``batch`` tokens drawn at random.

    ``indices`` [N, K] are the layer's routing decisions for N tokens; each trial draws
    ``batch`` of them without replacement (one decode step of ``batch`` sequences) and counts
    the experts their union needs.
    """
    n = indices.shape[0]
    if not 1 <= batch <= n:
        raise ValueError(f"batch must be in [1, {n}] (the tokens routed), got {batch}")
    hit = torch.zeros(n, num_experts, dtype=torch.bool)  # [N, E]
    hit[torch.arange(n).unsqueeze(1), indices] = True
    picks = torch.stack([torch.randperm(n, generator=gen)[:batch] for _ in range(trials)])  # [T, B]
    return hit[picks].any(dim=1).sum(dim=1).double().mean().item()  # sync: profiling only


def record_routes(engine, windows: list[list[int]]) -> dict[int, torch.Tensor]:
    """Every layer's exact routing of every token of ``windows``, teacher-forced: layer -> [N, K].

    Each window is one prompt, prefilled alone (so no row is padding) for one new token: the
    prefill is the only pass, which the row count checks.
    """
    from specmoe.sampling import SamplingParams

    if engine.runtime is not None:
        raise ValueError("record_routes needs a resident engine (every pass exact, no draft passes)")
    blocks = engine.model.moe_blocks()
    routes: dict[int, list[torch.Tensor]] = {}

    def keep(router, x, logits, weights, indices):
        routes.setdefault(router.layer, []).append(indices.cpu())  # [N, K]  # sync: profiling only
        return logits, weights, indices

    for _, block in blocks:
        block.gate.add_hook(keep)
    try:
        for window in windows:
            engine.generate([window], SamplingParams(max_new_tokens=1))
    finally:
        for _, block in blocks:
            block.gate.remove_hook(keep)
    merged = {layer: torch.cat(parts) for layer, parts in sorted(routes.items())}
    expected = sum(len(w) for w in windows)
    wrong = {layer: t.shape[0] for layer, t in merged.items() if t.shape[0] != expected}
    if wrong or len(merged) != len(blocks):
        got = wrong or f"{len(merged)} layers"
        raise RuntimeError(f"expected {expected} routed tokens in each of {len(blocks)} layers, got {got}")
    return merged


def calibration_prompts(text: str, count: int, chars: int = 400) -> list[str]:
    """``count`` evenly spaced windows of ``text`` as calibration prompts."""
    if not text.strip():
        raise ValueError("the calibration text is empty")
    step = max(1, (len(text) - chars) // max(1, count))
    return [text[i * step : i * step + chars] for i in range(count) if text[i * step : i * step + chars].strip()]
