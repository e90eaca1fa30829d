"""Configuration of the engine and of its decoder, validated once, here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from specmoe.expert_cache import POLICIES
from specmoe.loader import parse_dtype

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shakespeare-tiny-moe"
MODES = ("resident", "ondemand", "pregate", "specmoe")
DRAFT_POLICIES = ("resident", "shadow")


@dataclass
class DecoderConfig:
    """Where experts live and how the decoder hides their transfers.

    mode:            resident (all experts local) | ondemand (fetch when routed) |
                     pregate (ondemand + next-layer lookahead prefetch) | specmoe (draft,
                     prefetch the draft's predicted experts, verify)
    draft_policy:    resident (draft with resident experts only) | shadow (draft with a low-bit
                     copy of every expert)
    k:               draft tokens per round, an integer in [0, k_max] or "auto" (adaptive)
    cache_budget:    expert cache size: a fraction (0, 1] of all expert bytes, or bytes (> 1)
    pinned_fraction: share of the budget pinned to the routing profile's hottest experts
    remote_compute:  let a missed expert with few tokens run on its store when moving the
                     activations costs less than moving the weights (results are identical)
    """

    mode: str = "resident"
    draft_policy: str = "shadow"
    k: int | str = "auto"
    k_max: int = 4
    cache_budget: float | int = 0.25
    pinned_fraction: float = 0.5
    eviction: str = "lfu"  # measured against LRU in bench/modes.py: higher hit rate
    shadow_bits: int = 4
    shadow_group_size: int = 32
    profile: str | Path | None = None
    remote_compute: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"unknown draft policy {self.draft_policy!r}; allowed: {', '.join(DRAFT_POLICIES)}")
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
        if self.k != "auto" and not (isinstance(self.k, int) and 0 <= self.k <= self.k_max):
            raise ValueError(f"k must be an integer in [0, k_max={self.k_max}] or 'auto', got {self.k!r}")
        if not (0 < self.cache_budget <= 1 or (isinstance(self.cache_budget, int) and self.cache_budget > 1)):
            raise ValueError(
                f"cache_budget must be a fraction in (0, 1] of the expert bytes or a byte count > 1, got {self.cache_budget!r}"
            )
        if not 0 <= self.pinned_fraction <= 1:
            raise ValueError(f"pinned_fraction must be in [0, 1], got {self.pinned_fraction}")
        if self.eviction not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.eviction!r}; allowed: {', '.join(POLICIES)}")
        if self.shadow_bits not in (4, 8):
            raise ValueError(f"shadow_bits must be 4 or 8, got {self.shadow_bits}")

    @property
    def speculative(self) -> bool:
        return self.mode == "specmoe"

    def budget_bytes(self, expert_bytes: int) -> int:
        if isinstance(self.cache_budget, int) and self.cache_budget > 1:
            return self.cache_budget
        return int(self.cache_budget * expert_bytes)


def parse_budget(text: str) -> float | int:
    """``0.25`` -> a fraction; ``64MB``, ``1.5GiB``, ``1000000`` -> bytes."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    t = text.strip().lower()
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    value = float(t)
    return value if value <= 1 else int(value)


@dataclass
class EngineConfig:
    """How to run a model."""

    model: str | Path = SHIPPED_MODEL
    dtype: str = "fp32"
    device: str = "cpu"
    max_batch_size: int = 16
    max_model_len: int | None = None  # default: min(max_position_embeddings, 2048)
    max_prefill_tokens: int = 4096
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self):
        parse_dtype(self.dtype)
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
