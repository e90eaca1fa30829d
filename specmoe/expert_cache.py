"""The decoder's expert cache: a byte budget, a pinned hot set, and an eviction policy.

Keys are ``(layer, expert)``. The cache holds whatever the caller stores (weights on the
decoder's device) and accounts for it by the byte size given at ``put``. It never holds more
than its budget: an expert that cannot fit without evicting a pinned one is not admitted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Key = tuple[int, int]
POLICIES = ("lru", "lfu")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    admitted: int = 0
    evicted: int = 0
    refused: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertCache:
    """Byte-bounded expert cache.

    * ``pinned`` experts (the hot set from a routing profile) are never evicted;
    * the rest are evicted by ``policy``: ``lru`` (least recently used) or ``lfu`` (least
      frequently used since admission, ties broken by recency); the decoder's default is
      ``DecoderConfig.eviction``;
    * every layer keeps a share: eviction never takes a layer below ``layer_floor`` resident
      experts (a newcomer of that layer may replace one of them), so admitting one layer's
      experts cannot empty another's.
    """

    def __init__(self, budget_bytes: int, policy: str, layer_floor: int = 0):
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}; allowed: {', '.join(POLICIES)}")
        if layer_floor < 0:
            raise ValueError(f"layer_floor must be >= 0 experts, got {layer_floor}")
        self.budget = budget_bytes
        self.policy = policy
        self.layer_floor = layer_floor
        self.entries: OrderedDict[Key, tuple[Any, int]] = OrderedDict()  # oldest use first
        self.pinned: set[Key] = set()
        self.uses: Counter[Key] = Counter()
        # optional: key -> predicted use (the history mode's recent activation share; specmoe's
        # ExpertRuntime.predicted_use, the latest routing then recent use); evict the lowest first
        # (ties in the policy's order), and refuse a newcomer predicted to be used less than every
        # expert it would evict. Pinned experts are never candidates.
        self.priority: Callable[[Key], float] | None = None
        self.used_bytes = 0
        self.peak_bytes = 0
        self.stats = CacheStats()

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def resident(self, layer: int) -> set[int]:
        return {e for (l, e) in self.entries if l == layer}

    def peek(self, key: Key) -> Any | None:
        """The value without touching statistics or recency."""
        entry = self.entries.get(key)
        return entry[0] if entry else None

    def get(self, key: Key) -> Any | None:
        """Look up an expert for use: counts a hit or a miss and refreshes recency."""
        entry = self.entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.entries.move_to_end(key)
        self.uses[key] += 1
        return entry[0]

    def put(self, key: Key, value: Any, nbytes: int, pin: bool = False) -> bool:
        """Admit an expert, evicting unpinned ones as needed. Returns whether it was admitted."""
        if key in self.entries:
            self.entries.move_to_end(key)
            self.pinned |= {key} if pin else set()
            return True
        if not self._make_room(key, nbytes):
            self.stats.refused += 1
            return False
        self.entries[key] = (value, nbytes)
        self.used_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        self.uses[key] = 1
        if pin:
            self.pinned.add(key)
        self.stats.admitted += 1
        assert self.used_bytes <= self.budget  # invariant, not input validation
        return True

    def _make_room(self, newcomer: Key, nbytes: int) -> bool:
        if nbytes > self.budget:
            return False
        held = Counter(layer for layer, _ in self.entries)
        held[newcomer[0]] += 1
        free = self.budget - self.used_bytes
        chosen = []
        for key in self._eviction_order():
            if free >= nbytes:
                break
            if held[key[0]] <= self.layer_floor:
                continue  # the layer keeps its share
            held[key[0]] -= 1
            chosen.append(key)
            free += self.entries[key][1]
        if free < nbytes:
            return False
        if self.priority is not None and chosen and self.priority(newcomer) < min(map(self.priority, chosen)):
            return False
        for key in chosen:
            self._evict(key)
        return True

    def _eviction_order(self) -> list[Key]:
        candidates = [k for k in self.entries if k not in self.pinned]  # oldest use first
        if self.policy == "lfu":
            recency = {k: i for i, k in enumerate(candidates)}
            candidates.sort(key=lambda k: (self.uses[k], recency[k]))
        if self.priority is not None:
            candidates.sort(key=self.priority)  # stable: ties keep the policy's order
        return candidates

    def _evict(self, key: Key) -> None:
        _, nbytes = self.entries.pop(key)
        self.used_bytes -= nbytes
        self.uses.pop(key, None)
        self.stats.evicted += 1

    def pin_hot_set(self, ranked: Iterable[Key], load, max_bytes: int) -> list[Key]:
        """Pin experts in ``ranked`` order (hottest first) until ``max_bytes`` is used.

        ``load(key) -> (value, nbytes)`` supplies the weights. Returns the keys pinned.
        """
        pinned = []
        for key in ranked:
            value, nbytes = load(key)
            if self.used_bytes + nbytes > min(max_bytes, self.budget):
                break
            self.put(key, value, nbytes, pin=True)
            pinned.append(key)
        return pinned
