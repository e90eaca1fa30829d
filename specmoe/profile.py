"""Routing profiles: how often each layer's router picks each expert on calibration prompts.

The decoder pins the hottest experts from a profile in its expert cache. A profile is a
small JSON file::

    {"format": "specmoe-routing-profile/1", "model_type": "mixtral", "num_layers": 4,
     "num_experts": 8, "tokens": 4096, "counts": {"0": [..8 ints..], ...}}
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


def calibration_prompts(text: str, count: int, chars: int = 400) -> list[str]:
    """``count`` evenly spaced windows of ``text`` as calibration prompts."""
    if not text.strip():
        raise ValueError("the calibration text is empty")
    step = max(1, (len(text) - chars) // max(1, count))
    return [text[i * step : i * step + chars] for i in range(count) if text[i * step : i * step + chars].strip()]
