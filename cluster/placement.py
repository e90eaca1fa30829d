"""Which expert store holds which (layer, expert) shard.

Shards are placed by bytes, largest first, each on the ``replication`` least-loaded stores
that do not already hold it, so stores end up within one shard of each other and every
replica of a shard is on a different store.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[int, int]


@dataclass(frozen=True)
class Placement:
    """``stores[i]`` is the set of shards store i holds; ``owners[key]`` the stores holding a shard
    (primary first)."""

    stores: tuple[frozenset[Key], ...]
    owners: dict[Key, tuple[int, ...]]

    def bytes_per_store(self, sizes: dict[Key, int]) -> list[int]:
        return [sum(sizes[k] for k in held) for held in self.stores]


def plan_placement(sizes: dict[Key, int], num_stores: int, replication: int = 1) -> Placement:
    """Place every shard in ``sizes`` (key -> bytes) on ``replication`` of ``num_stores`` stores."""
    if num_stores < 1:
        raise ValueError(f"need at least one store, got {num_stores}")
    if not 1 <= replication <= num_stores:
        raise ValueError(f"replication must be in [1, {num_stores}] (the number of stores), got {replication}")
    load = [0] * num_stores
    held: list[set[Key]] = [set() for _ in range(num_stores)]
    owners: dict[Key, tuple[int, ...]] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        chosen = sorted(range(num_stores), key=lambda s: (load[s], s))[:replication]
        for store in chosen:
            load[store] += sizes[key]
            held[store].add(key)
        owners[key] = tuple(chosen)
    return Placement(tuple(frozenset(h) for h in held), owners)
