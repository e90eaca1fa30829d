"""The ``ExpertStore`` actor: a store's experts in the Ray object store and behind gRPC.

At start it loads its assigned shards from a prepared directory and checks every tensor's
CRC-32 (a corrupt or truncated shard makes the actor fail to start, naming the file and
the tensor), publishes each expert tensor once with ``ray.put`` (bf16 as a ``uint16`` numpy
view, so a get on the same node is zero-copy), and serves ``ExpertService`` over gRPC.

Objects made by ``ray.put`` die with the actor: after a restart (``max_restarts``) the store
publishes again and clients must refresh their references.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import ray
import torch

from actors.grpc_service import ExpertTable, ServerConfig, serve_experts

STORE_RESOURCE = "expert_store"
NUMPY_VIEWS = {torch.float32: (np.float32, torch.float32), torch.bfloat16: (np.uint16, torch.int16),
               torch.float16: (np.float16, torch.float16)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing the tensor's bytes (bf16 as uint16)."""
    np_dtype, view = NUMPY_VIEWS[t.dtype]
    return t.contiguous().view(view).numpy().view(np_dtype)


def from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor over a (read-only) array from ``to_numpy``: no copy."""
    with warnings.catch_warnings():  # read-only on purpose: experts are never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).view(dtype)


class ExpertStore:
    """Plain class; ``store_actor()`` makes it a Ray actor on a store node."""

    def __init__(self, shard_dir: str, keys: list[tuple[int, int]] | None = None,
                 grpc: ServerConfig | None = None, verify: bool = True):
        self.table = ExpertTable(shard_dir, keys, verify)
        self.published: dict[tuple[int, int], dict[str, ray.ObjectRef]] = {}
        self.publish()
        self.server, self.port = serve_experts(self.table, grpc) if grpc is not None else (None, None)
        self.grpc_host = grpc.host if grpc is not None else None

    def publish(self) -> None:
        """``ray.put`` every expert tensor (again): references handed out before are no longer served.

        The table then reads the published copies (zero-copy views of this node's object store),
        so gRPC and Compute share them and the process holds no second copy of its experts.
        """
        self.published = {
            key: {name: ray.put(to_numpy(t)) for name, t in tensors.items()} for key, tensors in self.table.tensors.items()
        }
        slots = [(key, name) for key, refs in self.published.items() for name in refs]
        arrays = ray.get([self.published[key][name] for key, name in slots])  # sync: one get for all, on this node
        for (key, name), array in zip(slots, arrays):
            self.table.tensors[key][name] = from_numpy(array, self.table.tensors[key][name].dtype)

    def manifest(self) -> dict:
        """The model fingerprint and the manifest entries of every tensor this store holds."""
        return {"model": self.table.model, "entries": [e for key in self.table.keys for e in self.table.entries[key].values()]}

    def refs(self, layer: int, experts: list[int]) -> dict[int, dict[str, ray.ObjectRef]]:
        """``{expert: {"gate_up": ref, "down": ref}}``; raises KeyError naming experts this store lacks."""
        missing = [e for e in experts if (layer, e) not in self.published]
        if missing:
            raise KeyError(f"this store has no experts {missing} of layer {layer}")
        return {e: self.published[(layer, e)] for e in experts}


    def health(self) -> dict:
        return {"serving": True, "experts": len(self.table.keys), "bytes": self.table.nbytes, "model": self.table.model,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "grpc": self.grpc_address()}

    def grpc_address(self) -> str | None:
        return f"{self.grpc_host}:{self.port}" if self.port else None


def store_actor(max_restarts: int = 0, **options):
    """``ExpertStore`` as a Ray actor class, on a node with the ``expert_store`` resource.

    ``num_cpus=0``: a store holds no CPU for its lifetime (it would starve a small node).
    """
    return ray.remote(num_cpus=0, resources={STORE_RESOURCE: 1}, max_restarts=max_restarts, **options)(ExpertStore)
