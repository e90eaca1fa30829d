"""Prepared shards on first use, and experts for one command or benchmark run.

``prepared_dir(model)`` prepares a model's shards once (cached by model fingerprint);
``remote_experts(model, transport)`` starts a local multi-node cluster with one store node,
brings up the stores with ``build_deployment`` and yields a source over ``ray`` or
``grpc`` (or the in-process ``local`` reader).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from specmoe.shards import PrepareConfig, fingerprint, prepare

TRANSPORTS = ("local", "ray", "grpc")


def prepared_dir(model_dir) -> Path:
    """Shards of ``model_dir`` under the cache (``SPECMOE_CACHE``, default ~/.cache/specmoe).

    Prepared once; verified on every call (the CRC-32 of every file, one read of the cache),
    and a cache with a missing or corrupt file, or prepared before the affinity table existed,
    is repaired by ``prepare`` before it is used (it writes only what is missing).
    """
    import sys

    from specmoe.affinity import has_affinity
    from specmoe.shards import verify_prepared
    from specmoe.weights import Checkpoint

    root = Path(os.environ.get("SPECMOE_CACHE", Path.home() / ".cache" / "specmoe")) / "shards"
    out = root / fingerprint(Checkpoint(model_dir))
    if (out / "manifest.json").exists():
        bad = verify_prepared(out)
        if not bad and has_affinity(out):
            return out
        print(f"[specmoe] shard cache {out}: {len(bad)} file(s) do not match the manifest ({', '.join(bad[:4])}); "
              "rewriting them", file=sys.stderr)
    prepare(PrepareConfig(model_dir, out), progress=False)
    return out


@contextlib.contextmanager
def remote_experts(model_dir, transport: str, verify: bool = False, link=None) -> Iterator:
    """Yield ``fetch(layer, experts)`` for ``model_dir``'s experts over ``transport``, behind
    an emulated link when ``link`` (a ``specmoe.link.LinkConfig``) is given.

    ``ray`` and ``grpc`` start a local cluster with one store node; the caller (the decoder)
    runs on the head node, so every expert crosses between nodes.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown experts transport {transport!r}; allowed: {', '.join(TRANSPORTS)}")
    if transport == "local":
        from specmoe.link import EmulatedLink
        from specmoe.offload import checkpoint_fetcher

        source = checkpoint_fetcher(model_dir)
        source = EmulatedLink(source, link) if link is not None else source
        try:
            yield source
        finally:
            source.close()
        return
    from cluster.deployment import DecodersSpec, DeploymentSpec, ModelSpec, TransportSpec, build_deployment
    from cluster.local import ClusterSpec, LocalCluster

    spec = DeploymentSpec(name="experts", model=ModelSpec(path=str(model_dir)), decoders=DecodersSpec(count=0),
                          transport=TransportSpec(kind=transport, verify=verify, link=link))
    with LocalCluster(ClusterSpec(stores=1, decoders=0, object_store_mb=512)):
        deployment = build_deployment(spec)
        source = deployment.source()
        try:
            yield source
        finally:
            source.close()
            deployment.shutdown()
