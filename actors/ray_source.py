"""The Ray object store transport: ``RaySource`` fetches experts published by ``ExpertStore``s.

References are asked for once per store and layer and then cached; a fetch is a batched
``ray.get`` of cached references, done once for all experts of a call when the first of
them is needed. When a store does not answer, the expert is fetched from a replica; when
none answers, ``ExpertUnavailableError`` names the expert. ``refresh()`` drops cached
references (after a store restarted and published again).
"""

from __future__ import annotations

import time
import warnings
import zlib

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, ObjectLostError, OwnerDiedError, RayActorError

from specmoe.expert_source import ExpertUnavailableError, TransportMetrics
from specmoe.shards import EXPERT_TENSORS, CorruptShardError

STORE_DOWN = (RayActorError, ActorUnavailableError, ObjectLostError, OwnerDiedError, GetTimeoutError)


def to_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor over the array ``ray.get`` returned: no copy, read-only (a view of the object store)."""
    with warnings.catch_warnings():  # read-only on purpose: fetched experts are never written
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


class PendingExpert:
    """A future for one expert of a batched fetch: ``result()`` gets the whole batch at once."""

    def __init__(self, batch: "_Batch", expert: int):
        self.batch, self.expert = batch, expert

    def done(self) -> bool:
        return self.batch.done()

    def result(self):
        return self.batch.result(self.expert)


class _Batch:
    def __init__(self, source: "RaySource", layer: int, experts: list[int]):
        self.source, self.layer, self.experts = source, layer, experts
        source.ensure_refs(layer, experts)
        self.refs = {e: source.cached[(layer, e)][1] for e in experts}
        self.started = time.perf_counter()
        self.results: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def done(self) -> bool:
        if self.results is not None:
            return True
        flat = [r for refs in self.refs.values() for r in refs.values()]
        ready, _ = ray.wait(flat, num_returns=len(flat), timeout=0, fetch_local=True)
        return len(ready) == len(flat)

    def result(self, expert: int):
        if self.results is None:
            self.results = self.source.collect(self)
        return self.results[expert]


class RaySource:
    """Experts from ``ExpertStore`` actors through the Ray object store.

    ``owners[(layer, expert)]`` lists the indices of the stores holding it, primary first.
    """

    def __init__(self, stores: list, owners: dict[tuple[int, int], tuple[int, ...]], verify: bool = True,
                 timeout_s: float = 30.0):
        self.stores = list(stores)
        self.owners = owners
        self.verify = verify
        self.timeout_s = timeout_s
        self.metrics = TransportMetrics()
        self.entries: dict[tuple[int, int, str], dict] = {}
        self.cached: dict[tuple[int, int], tuple[int, dict]] = {}  # key -> (store, {name: ref})
        self.down: set[int] = set()

    def refs_for(self, layer: int, expert: int) -> dict:
        """``{"gate_up": ref, "down": ref}`` of one expert (asked for once, then cached)."""
        self.ensure_refs(layer, [expert])
        return self.cached[(layer, expert)][1]

    def ensure_refs(self, layer: int, experts: list[int]) -> None:
        """Cache the references of ``experts``: each store holding some is asked at once for all of
        the layer's experts it holds, all stores in parallel, answers awaited once; a store that
        does not answer is marked down and its experts are asked of their next replica."""
        missing = [e for e in experts if (layer, e) not in self.cached]
        while missing:
            asks = {}  # store -> experts of this layer it holds
            for e in missing:
                owners = self.owners.get((layer, e))
                if not owners:
                    raise KeyError(f"no store holds expert {e} of layer {layer}")
                alive = [s for s in owners if s not in self.down]
                if not alive:
                    raise ExpertUnavailableError(
                        f"expert {e} of layer {layer}: no store holding it answered (stores {list(owners)}, "
                        f"down: {sorted(self.down)}); after a store restarts, call refresh()"
                    )
                asks.setdefault(alive[0], sorted(x for (l, x), o in self.owners.items() if l == layer and alive[0] in o))
            calls = {store: self.stores[store].refs.remote(layer, held) for store, held in asks.items()}
            ray.wait(list(calls.values()), num_returns=len(calls), timeout=self.timeout_s)  # sync: one wait for all stores
            for store, call in calls.items():
                try:
                    refs = ray.get(call, timeout=0)
                except STORE_DOWN:
                    self.down.add(store)
                    continue
                for e, named in refs.items():
                    self.cached[(layer, e)] = (store, named)
            if not self.entries:
                self._learn_entries(next(iter(calls)))
            missing = [e for e in missing if (layer, e) not in self.cached]

    def _learn_entries(self, store: int) -> None:
        for s in [store] + [i for i in range(len(self.stores)) if i != store]:
            try:
                for e in ray.get(self.stores[s].manifest.remote(), timeout=self.timeout_s)["entries"]:
                    self.entries[(e["layer"], e["expert"], e["name"])] = e
            except STORE_DOWN:
                self.down.add(s)

    def fetch(self, layer: int, experts: list[int]) -> dict:
        batch = _Batch(self, layer, experts)
        return {e: PendingExpert(batch, e) for e in experts}

    __call__ = fetch

    def collect(self, batch: _Batch) -> dict:
        """One ``ray.get`` for the whole batch; experts whose store is down are retried on a replica."""
        keys = [(e, name) for e in batch.experts for name in EXPERT_TENSORS]
        try:
            arrays = ray.get([batch.refs[e][name] for e, name in keys], timeout=self.timeout_s)
        except STORE_DOWN:
            return self._failover(batch)
        out, nbytes = {}, 0
        for (e, name), array in zip(keys, arrays):
            entry = self.entries[(batch.layer, e, name)]
            if self.verify and zlib.crc32(array) != entry["crc32"]:
                raise CorruptShardError(f"layer {batch.layer} expert {e} tensor {name!r}: bytes do not match the manifest")
            out.setdefault(e, {})[name] = to_tensor(array, entry["dtype"])
            nbytes += array.nbytes
        self.metrics.record(nbytes, len(batch.experts), time.perf_counter() - batch.started)
        return {e: (t["gate_up"], t["down"]) for e, t in out.items()}

    def _failover(self, batch: _Batch) -> dict:
        self.metrics.failovers += 1
        stores = {self.cached[(batch.layer, e)][0] for e in batch.experts if (batch.layer, e) in self.cached}
        self.down |= stores
        for e in batch.experts:
            self.cached.pop((batch.layer, e), None)
        retry = _Batch(self, batch.layer, batch.experts)  # asks replicas (or raises ExpertUnavailableError)
        return self.collect(retry)

    def refresh(self) -> None:
        """Forget cached references and which stores were down (after a store restarted)."""
        self.cached.clear()
        self.down.clear()

    def close(self) -> None:
        self.cached.clear()
