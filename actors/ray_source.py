"""The Ray object store transport: ``RaySource`` fetches experts published by ``ExpertStore``s.

References are asked for once per store and layer and then cached; a fetch is a batched
``ray.get`` of cached references, done once for all experts of a call when the first of
them is needed.

Failures are judged from the failed fetch's own references: each reference remembers the
store that handed it out and that store's *generation* (bumped each time the store is found
failed). Only a store whose references failed is suspected; a fetch whose references are
from an older generation (a stale batch, issued before another fetch found the failure) was
already accounted for and blames no one. A suspected store is probed (``health``): if it
answers it restarted, so its experts are asked for again; if not, it is *down* and its
experts come from a replica. A down store is probed again after ``retry_after_s``. When no
store holding an expert answers, that expert's future raises ``ExpertUnavailableError``;
the other experts of the same fetch are still delivered.
"""

from __future__ import annotations

import time
import warnings
import zlib
from typing import NamedTuple

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


class Held(NamedTuple):
    """An expert's references, with the store that handed them out and its generation then."""

    store: int
    generation: int
    refs: dict  # {"gate_up": ref, "down": ref}


class PendingExpert:
    """A future for one expert of a batched fetch: ``result()`` gets the whole batch at once."""

    def __init__(self, batch: "_Batch", expert: int):
        self.batch, self.expert = batch, expert

    def done(self) -> bool:
        return self.batch.done()

    def result(self):
        return self.batch.result(self.expert)


class _Batch:
    """The experts of one ``fetch``: their references as they were when the fetch was made."""

    def __init__(self, source: "RaySource", layer: int, experts: list[int]):
        self.source, self.layer, self.experts = source, layer, experts
        self.unavailable = source.ask(layer, experts)  # expert -> error: no store holding it answered
        self.held = {e: source.cached[(layer, e)] for e in experts if e not in self.unavailable}
        self.started = time.perf_counter()
        self.results: dict[int, object] | None = None  # expert -> (gate_up, down) or the error it raises

    def done(self) -> bool:
        if self.results is not None:
            return True
        flat = [r for held in self.held.values() for r in held.refs.values()]
        if not flat:
            return True  # every expert of it is unavailable: result() raises at once
        try:
            ready, _ = ray.wait(flat, num_returns=len(flat), timeout=0, fetch_local=True)
        except STORE_DOWN:
            return True  # result() finds out which store failed
        return len(ready) == len(flat)

    def result(self, expert: int):
        if self.results is None:
            self.results = self.source.collect(self)
        out = self.results[expert]
        if isinstance(out, Exception):
            raise out
        return out


class RaySource:
    """Experts from ``ExpertStore`` actors through the Ray object store.

    ``owners[(layer, expert)]`` lists the indices of the stores holding it, primary first.
    ``timeout_s`` bounds one wait for a store; ``probe_timeout_s`` one health probe;
    ``retry_after_s`` is how long a store found down is skipped before it is probed again.
    """

    def __init__(self, stores: list, owners: dict[tuple[int, int], tuple[int, ...]], verify: bool = True,
                 timeout_s: float = 30.0, retry_after_s: float = 5.0, probe_timeout_s: float = 2.0):
        for name, value in (("timeout_s", timeout_s), ("retry_after_s", retry_after_s), ("probe_timeout_s", probe_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        self.stores = list(stores)
        self.owners = owners
        self.verify = verify
        self.timeout_s, self.retry_after_s, self.probe_timeout_s = timeout_s, retry_after_s, probe_timeout_s
        self.metrics = TransportMetrics()
        self.entries: dict[tuple[int, int, str], dict] = {}  # (layer, expert, name) -> manifest entry
        self.learned: set[int] = set()  # stores whose manifest entries are in self.entries
        self.cached: dict[tuple[int, int], Held] = {}
        self.generation = [0] * len(self.stores)
        self.down: dict[int, float] = {}  # store -> when it was last found down (time.monotonic)

    # -- references ------------------------------------------------------------------------

    def refs_for(self, layer: int, expert: int) -> dict:
        """``{"gate_up": ref, "down": ref}`` of one expert (asked for once, then cached)."""
        self.ensure_refs(layer, [expert])
        return self.cached[(layer, expert)].refs

    def ensure_refs(self, layer: int, experts: list[int]) -> None:
        """Cache the references of ``experts``, or raise ``ExpertUnavailableError`` for the first
        expert no store answered for."""
        unavailable = self.ask(layer, experts)
        if unavailable:
            raise next(iter(unavailable.values()))

    def ask(self, layer: int, experts: list[int]) -> dict[int, ExpertUnavailableError]:
        """Cache the references of ``experts``: each store holding some is asked at once for all of
        the layer's experts it holds, all stores in parallel, answers awaited once; a store that
        does not answer is marked down and its experts are asked of their next replica.
        Returns the experts that no store holding them answered for, with their errors."""
        unavailable: dict[int, ExpertUnavailableError] = {}
        missing = [e for e in experts if (layer, e) not in self.cached]
        while missing:
            asks: dict[int, list[int]] = {}  # store -> experts of this layer it holds
            for e in missing:
                owners = self.owners.get((layer, e))
                if not owners:
                    raise KeyError(f"no store holds expert {e} of layer {layer}")
                alive = [s for s in owners if self._usable(s)]
                if not alive:
                    unavailable[e] = ExpertUnavailableError(
                        f"expert {e} of layer {layer}: no store holding it answered (stores {list(owners)}, "
                        f"down: {sorted(self.down)}); a down store is probed again {self.retry_after_s:g} s after it failed"
                    )
                    continue
                asks.setdefault(alive[0], sorted(x for (l, x), o in self.owners.items() if l == layer and alive[0] in o))
            calls = {store: self.stores[store].refs.remote(layer, held) for store, held in asks.items()}
            manifests = {s: self.stores[s].manifest.remote() for s in asks if s not in self.learned}
            ray.wait([*calls.values(), *manifests.values()], num_returns=len(calls) + len(manifests),
                     timeout=self.timeout_s)  # sync: one wait for all stores
            for store, call in calls.items():
                try:
                    if store in manifests:  # its manifest entries, learned once per store
                        entries = ray.get(manifests[store], timeout=0)["entries"]
                        self.entries.update({(e["layer"], e["expert"], e["name"]): e for e in entries})
                        self.learned.add(store)
                    refs = ray.get(call, timeout=0)
                except STORE_DOWN:
                    self._mark_down(store)
                    self.metrics.failovers += 1  # its experts are asked of a replica (if any)
                    continue
                for e, named in refs.items():
                    self.cached[(layer, e)] = Held(store, self.generation[store], named)
            missing = [e for e in missing if (layer, e) not in self.cached and e not in unavailable]
        return unavailable

    # -- store health ----------------------------------------------------------------------

    def _usable(self, store: int) -> bool:
        """Not down, or down long enough ago that a health probe is due and it answered."""
        if store not in self.down:
            return True
        if time.monotonic() - self.down[store] < self.retry_after_s:
            return False
        if self._alive(store):
            del self.down[store]
            return True
        self.down[store] = time.monotonic()
        return False

    def _alive(self, store: int) -> bool:
        try:
            return bool(ray.get(self.stores[store].health.remote(), timeout=self.probe_timeout_s)["serving"])
        except STORE_DOWN:
            return False

    def _forget(self, store: int) -> None:
        """Drop every reference ``store`` handed out: a later fetch asks it (or a replica) again."""
        self.generation[store] += 1
        for key in [k for k, held in self.cached.items() if held.store == store]:
            del self.cached[key]

    def _mark_down(self, store: int) -> None:
        self._forget(store)
        self.down[store] = time.monotonic()

    def _suspect(self, store: int, generation: int) -> None:
        """References of ``store`` from ``generation`` failed: forget them; down unless it answers."""
        if generation != self.generation[store]:
            return  # a stale batch: another fetch already found this failure and dealt with it
        self._forget(store)
        if not self._alive(store):
            self.down[store] = time.monotonic()

    # -- fetching --------------------------------------------------------------------------

    def fetch(self, layer: int, experts: list[int]) -> dict:
        batch = _Batch(self, layer, experts)
        return {e: PendingExpert(batch, e) for e in experts}

    __call__ = fetch

    def collect(self, batch: _Batch) -> dict[int, object]:
        """Every expert of the batch: (gate_up, down), or the error its future raises. One
        ``ray.get`` for all; the experts of a store whose references failed are asked again
        (of the restarted store, or a replica) and fetched once more."""
        out: dict[int, object] = dict(batch.unavailable)
        nbytes, started = 0, batch.started
        for _ in range(len(self.stores) + 1):  # each retry follows a store found failed
            got, failed = self._get(batch)
            for e, pair in got.items():
                out[e] = pair
                nbytes += sum(t.nbytes for t in pair) if isinstance(pair, tuple) else 0
            if not failed:
                break
            self.metrics.failovers += 1
            for store, generation in failed:
                self._suspect(store, generation)
            batch = _Batch(self, batch.layer, [e for e in batch.held if e not in got])
            out.update(batch.unavailable)
        else:
            for e in batch.held:
                out[e] = ExpertUnavailableError(f"expert {e} of layer {batch.layer}: every store holding it failed")
        delivered = sum(isinstance(v, tuple) for v in out.values())
        self.metrics.record(nbytes, delivered, time.perf_counter() - started)
        return out

    def _get(self, batch: _Batch) -> tuple[dict[int, object], set[tuple[int, int]]]:
        """The batch's experts that arrived, and the (store, generation) of references that failed."""
        keys = [(e, name) for e in batch.held for name in EXPERT_TENSORS]
        deadline = time.monotonic() + self.timeout_s
        try:
            arrays = ray.get([batch.held[e].refs[name] for e, name in keys], timeout=self.timeout_s)
            return self._check(batch.layer, keys, arrays), set()
        except STORE_DOWN:
            pass
        got, failed = {}, set()  # which store failed: each store's references on their own
        for store, generation in sorted({(h.store, h.generation) for h in batch.held.values()}):
            part = [(e, name) for e, name in keys if batch.held[e][:2] == (store, generation)]
            try:
                wait = max(self.probe_timeout_s, deadline - time.monotonic())
                arrays = ray.get([batch.held[e].refs[name] for e, name in part], timeout=wait)
            except STORE_DOWN:
                failed.add((store, generation))
                continue
            got.update(self._check(batch.layer, part, arrays))
        return got, failed

    def _check(self, layer: int, keys: list[tuple[int, str]], arrays: list) -> dict[int, object]:
        tensors: dict[int, dict[str, torch.Tensor]] = {}
        out: dict[int, object] = {}
        for (e, name), array in zip(keys, arrays):
            entry = self.entries[(layer, e, name)]
            if self.verify and zlib.crc32(array) != entry["crc32"]:
                out[e] = CorruptShardError(f"layer {layer} expert {e} tensor {name!r}: bytes do not match the manifest")
                continue
            tensors.setdefault(e, {})[name] = to_tensor(array, entry["dtype"])
        for e, named in tensors.items():
            if e not in out:
                out[e] = tuple(named[n] for n in EXPERT_TENSORS)
        return out

    def refresh(self) -> None:
        """Forget cached references and which stores were down (after a store restarted)."""
        self.cached.clear()
        self.down.clear()
        self.generation = [g + 1 for g in self.generation]

    def close(self) -> None:
        self.cached.clear()
