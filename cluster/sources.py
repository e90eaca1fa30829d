"""Expert stores for a prepared model, and the sources a decoder fetches through.

``start_stores`` plans placement and starts one ``ExpertStore`` per store node;
``remote_experts(model, transport)`` does everything for one command or benchmark run:
prepares shards (cached by model fingerprint), starts a local multi-node cluster with a
store node, and yields a fetch function over ``ray`` or ``grpc`` (or in-process ``local``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.placement import Placement, plan_placement
from specmoe.shards import EXPERT_TENSORS, PrepareConfig, ShardReader, fingerprint, prepare

TRANSPORTS = ("local", "ray", "grpc")


@dataclass
class StoreSet:
    handles: list
    placement: Placement
    grpc_addresses: list[str | None]

    def ray_source(self, verify: bool = True):
        from actors.ray_source import RaySource

        return RaySource(self.handles, self.placement.owners, verify=verify)

    def grpc_source(self, cfg=None, verify: bool = True):
        from actors.grpc_source import GrpcSource

        if None in self.grpc_addresses:
            raise ValueError("these stores were started without gRPC")
        return GrpcSource(self.grpc_addresses, cfg, verify=verify, owners=self.placement.owners)


def expert_sizes(shard_dir) -> dict[tuple[int, int], int]:
    reader = ShardReader(shard_dir)
    return {key: sum(e["nbytes"] for e in reader.entries(*key) if e["name"] in EXPERT_TENSORS) for key in reader.keys()}


def start_stores(shard_dir, num_stores: int = 1, replication: int = 1, grpc=None, max_restarts: int = 0,
                 verify: bool = True) -> StoreSet:
    """Start ``num_stores`` ExpertStore actors (one per store node) holding a placement of the shards."""
    import ray

    from actors.expert_store import store_actor

    placement = plan_placement(expert_sizes(shard_dir), num_stores, replication)
    actor = store_actor(max_restarts)
    handles = [actor.remote(str(shard_dir), sorted(keys), grpc, verify) for keys in placement.stores]
    ray.get([h.health.remote() for h in handles])  # raises here if a store failed to start
    return StoreSet(handles, placement, ray.get([h.grpc_address.remote() for h in handles]))


def prepared_dir(model_dir) -> Path:
    """Shards of ``model_dir`` under the cache (``SPECMOE_CACHE``, default ~/.cache/specmoe).

    Prepared once; verified on every call (the CRC-32 of every file, one read of the cache),
    and a cache with a missing or corrupt file is repaired by ``prepare`` before it is used.
    """
    import sys

    from specmoe.shards import verify_prepared
    from specmoe.weights import Checkpoint

    root = Path(os.environ.get("SPECMOE_CACHE", Path.home() / ".cache" / "specmoe")) / "shards"
    out = root / fingerprint(Checkpoint(model_dir))
    if (out / "manifest.json").exists():
        bad = verify_prepared(out)
        if not bad:
            return out
        print(f"[specmoe] shard cache {out}: {len(bad)} file(s) do not match the manifest ({', '.join(bad[:4])}); "
              "rewriting them", file=sys.stderr)
    prepare(PrepareConfig(model_dir, out), progress=False)
    return out


@contextlib.contextmanager
def remote_experts(model_dir, transport: str, verify: bool = False) -> Iterator:
    """Yield ``fetch(layer, experts)`` for ``model_dir``'s experts over ``transport``.

    ``ray`` and ``grpc`` start a local cluster with one store node; the caller (the decoder)
    runs on the head node, so every expert crosses between nodes.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown experts transport {transport!r}; allowed: {', '.join(TRANSPORTS)}")
    if transport == "local":
        from specmoe.offload import checkpoint_fetcher

        yield checkpoint_fetcher(model_dir)
        return
    from cluster.local import ClusterSpec, LocalCluster
    from actors.grpc_service import ServerConfig

    shards = prepared_dir(model_dir)
    with LocalCluster(ClusterSpec(stores=1, decoders=0, object_store_mb=512)):
        stores = start_stores(shards, grpc=ServerConfig() if transport == "grpc" else None, verify=True)
        source = stores.ray_source(verify) if transport == "ray" else stores.grpc_source(verify=verify)
        try:
            yield source
        finally:
            source.close()
