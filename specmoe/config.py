"""Configuration of the engine and of its decoder, validated once, here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from specmoe.expert_cache import POLICIES
from specmoe.loader import parse_dtype
from specmoe.quant import check_group_size

if TYPE_CHECKING:
    from specmoe.affinity import AffinityTable

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shakespeare-tiny-moe"
DRAFT_POLICIES = ("resident", "shadow", "hot")
MIGRATIONS = ("eager", "deferred")
HOT_SETS = ("temporal", "global", "random")
SUBSTITUTIONS = ("affinity", "random")


@dataclass(frozen=True)
class Mode:
    """What a mode means, decided once: every site reads these properties, never the name.

    offloaded:   experts live in a source and are fetched (False: every expert is loaded locally)
    speculative: rounds draft k tokens and verify them (k = 0 otherwise)
    lookahead:   every exact pass requests layer l+1's experts from layer l's hidden state
                 (prefill always does, in every offloaded mode)
    history:     prefetch from routing history (specmoe.history): after each exact layer, the
                 next two MoE layers' likeliest experts given the current routing
    remote:      every needed expert that is not resident, staged or in flight runs on its
                 store (activations move, not weights); needs a source with ``compute``
    static_hot:  the cache is only a pinned hot set, this share of all experts (the routing
                 profile's hottest); misses are fetched for their pass and not kept (None: a
                 cache with the budget and eviction policy)
    oracle:      replays a recorded routing trace of the same run (``DecoderConfig.trace``):
                 while layer l computes, layer l+1's experts of this pass are requested, and
                 the next pass's first layer while the last one computes
    """

    name: str
    offloaded: bool
    speculative: bool
    lookahead: bool
    help: str
    remote: bool = False
    static_hot: float | None = None
    history: bool = False
    oracle: bool = False


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("resident", offloaded=False, speculative=False, lookahead=False, help="every expert local: the reference"),
    Mode("ondemand", offloaded=True, speculative=False, lookahead=False, help="fetch an expert when the router picks it"),
    Mode("pregate", offloaded=True, speculative=False, lookahead=True,
         help="ondemand + next-layer lookahead prefetch"),
    Mode("specmoe", offloaded=True, speculative=True, lookahead=False,
         help="draft, prefetch the draft's predicted experts, verify"),
    Mode("remote", offloaded=True, speculative=False, lookahead=False, remote=True,
         help="run every non-resident expert on its store, moving activations (needs --experts grpc)"),
    Mode("history", offloaded=True, speculative=False, lookahead=False, history=True,
         help="prefetch the next layers' likeliest experts from decayed routing history (MoE-Infinity's, training-free)"),
    Mode("caching", offloaded=True, speculative=False, lookahead=False, static_hot=0.10,
         help="a static hot set (the routing profile's top 10% of experts) pinned, misses fetched on demand and not kept"),
    Mode("overlap", offloaded=True, speculative=False, lookahead=False, oracle=True,
         help="an oracle, the upper bound for prefetching: replays a recorded routing trace of the same run (needs "
              "--trace) and prefetches exactly the next layer's experts while a layer computes"),
)}


@dataclass
class DecoderConfig:
    """Where experts live and how the decoder hides their transfers.

    mode:            resident (all experts local) | ondemand (fetch when routed) |
                     pregate (ondemand + next-layer lookahead prefetch) | specmoe (draft,
                     prefetch the draft's predicted experts, verify)
    draft_policy:    resident (draft with resident experts only) | shadow (draft with a low-bit
                     copy of every expert)
                     | hot (the paper's: a pick outside the layer's hot_experts pinned experts, the
                     ones recent verification passes used most, drafts with its nearest pinned
                     expert by the affinity table (specmoe.affinity; by default the cosine distance
                     of the experts' router rows), keeping the router's weight)
    hot_experts:     experts per layer the hot draft policy drafts with
    hot_set:         which experts the hot policy pins: temporal (the paper's: the resident ones
                     recent verification passes used most) | global (the routing profile's
                     hottest hot_experts per layer, fixed; needs a profile) | random
                     (hot_experts seeded random experts per layer, fixed)
    substitution:    what a hot draft pick outside the pinned set runs: affinity (its nearest
                     pinned expert by the affinity table) | random (a seeded random pinned expert)
    affinity:        the hot policy's affinity table: a prepared directory, its affinity.json, or
                     the table itself (a deployment passes it so); None: the source's if it
                     carries one, else computed at start-up, saying so
    trace:           the overlap mode's routing trace (``specmoe.trace.RoutingTrace``, JSON)
    k:               draft tokens per round, an integer in [0, k_max] or "auto" (adaptive)
    cache_budget:    expert cache size, the unit in the syntax: a fraction of all expert bytes
                     (0.25, "25%"; in (0, 1]) or a size ("64MB", "1.5GiB", "1000000B")
    pinned_fraction: share of the budget pinned to the routing profile's hottest experts
    migration:       eager (request the draft's predicted experts as soon as each draft step
                     predicts them, so transfers overlap drafting) | deferred (the paper's:
                     request them once when verification starts, coalesced over the round)
    remote_compute:  let a missed expert with few tokens run on its store when moving the
                     activations costs less than moving the weights (results are identical)
    """

    mode: str = "resident"
    draft_policy: str = "shadow"
    k: int | str = "auto"
    k_max: int = 16
    cache_budget: float | str = 0.25
    pinned_fraction: float = 0.5
    eviction: str = "lfu"  # measured against LRU in bench/modes.py: higher hit rate
    shadow_bits: int = 4
    shadow_group_size: int = 32
    profile: str | Path | None = None
    remote_compute: bool = False
    migration: str = "eager"
    hot_experts: int = 4
    hot_set: str = "temporal"
    substitution: str = "affinity"
    affinity: str | Path | AffinityTable | None = None
    trace: str | Path | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"unknown draft policy {self.draft_policy!r}; allowed: {', '.join(DRAFT_POLICIES)}")
        if self.mode_spec.static_hot is not None and self.profile is None:
            raise ValueError(f"mode {self.mode!r} pins the routing profile's hottest experts: give a profile "
                             "(`specmoe profile` writes one)")
        if self.hot_set not in HOT_SETS:
            raise ValueError(f"unknown hot_set {self.hot_set!r}; allowed: {', '.join(HOT_SETS)}")
        if self.substitution not in SUBSTITUTIONS:
            raise ValueError(f"unknown substitution {self.substitution!r}; allowed: {', '.join(SUBSTITUTIONS)}")
        if self.hot_set == "global" and self.profile is None:
            raise ValueError("hot_set 'global' pins the routing profile's hottest experts per layer: give a profile "
                             "(`specmoe profile` writes one)")
        if self.mode_spec.oracle and self.trace is None:
            raise ValueError(f"mode {self.mode!r} replays a recorded routing trace: give trace "
                             "(specmoe.trace.record_trace writes one)")
        if not (isinstance(self.hot_experts, int) and self.hot_experts >= 1):
            raise ValueError(f"hot_experts must be an integer >= 1, got {self.hot_experts!r}")
        if self.migration not in MIGRATIONS:
            raise ValueError(f"unknown migration {self.migration!r}; allowed: {', '.join(MIGRATIONS)}")
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
        if self.k != "auto" and not (isinstance(self.k, int) and 0 <= self.k <= self.k_max):
            raise ValueError(f"k must be an integer in [0, k_max={self.k_max}] or 'auto', got {self.k!r}")
        parse_budget(self.cache_budget, "cache_budget")
        if not 0 <= self.pinned_fraction <= 1:
            raise ValueError(f"pinned_fraction must be in [0, 1], got {self.pinned_fraction}")
        if self.eviction not in POLICIES:
            raise ValueError(f"unknown eviction policy {self.eviction!r}; allowed: {', '.join(POLICIES)}")
        if self.shadow_bits not in (4, 8):
            raise ValueError(f"shadow_bits must be 4 or 8, got {self.shadow_bits}")
        check_group_size(self.shadow_bits, self.shadow_group_size, "shadow_group_size")

    @property
    def mode_spec(self) -> Mode:
        return MODES[self.mode]

    @property
    def speculative(self) -> bool:
        return self.mode_spec.speculative

    def budget_bytes(self, expert_bytes: int) -> int:
        return parse_budget(self.cache_budget, "cache_budget").bytes_of(expert_bytes)


SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BUDGET_FORMS = "a fraction of the expert bytes (25% or 0.25, at most 1) or a size with its unit (64MB, 1.5GiB, 1000000B)"
BUDGET_SYNTAX = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>%|[kmgt]i?b|b)?", re.IGNORECASE)


@dataclass(frozen=True)
class CacheBudget:
    """An expert cache size: a fraction of all expert bytes, or a number of bytes (exactly one is set)."""

    fraction: float | None = None
    nbytes: int | None = None

    def bytes_of(self, expert_bytes: int) -> int:
        return self.nbytes if self.nbytes is not None else int(self.fraction * expert_bytes)


def parse_budget(value: str | float, name: str = "--cache-budget") -> CacheBudget:
    """``25%``, ``0.25`` -> a fraction in (0, 1]; ``64MB``, ``1.5GiB``, ``1000000B`` -> bytes.

    The unit is in the syntax, never guessed from the size of the number: a bare number
    above 1 (``2``, ``1.5``) is refused, as are ``inf``, ``nan`` and negative values.
    ``name`` (the flag or field) is named in the error.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = Decimal(repr(float(value))) if math.isfinite(value) else Decimal(0), ""
    elif isinstance(value, str) and (m := BUDGET_SYNTAX.fullmatch(value.strip())):
        number, unit = Decimal(m["number"]), (m["unit"] or "").lower()
    else:
        raise ValueError(f"{name} must be {BUDGET_FORMS}, got {value!r}")
    if unit in ("", "%"):
        fraction = number / 100 if unit == "%" else number
        if not 0 < fraction <= 1:
            hint = "; a size needs its unit, for example 64MB" if unit == "" and fraction > 1 else ""
            raise ValueError(f"{name} must be {BUDGET_FORMS}, got {value!r}{hint}")
        return CacheBudget(fraction=float(fraction))
    nbytes = number * SIZE_UNITS[unit]
    if nbytes < 1 or nbytes != int(nbytes):
        raise ValueError(f"{name} must be {BUDGET_FORMS}, got {value!r}: a size is a whole number of bytes, at least 1")
    return CacheBudget(nbytes=int(nbytes))


def default_max_model_len(hf_config, configured: int | None = None) -> int:
    """The context length a decoder serves: ``configured``, else the model's, at most 2048."""
    return configured or min(hf_config.max_position_embeddings, 2048)


@dataclass
class EngineConfig:
    """How to run a model."""

    model: str | Path = SHIPPED_MODEL
    dtype: str = "fp32"
    device: str = "cpu"
    max_batch_size: int = 16
    max_model_len: int | None = None  # default: default_max_model_len(hf_config)
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
