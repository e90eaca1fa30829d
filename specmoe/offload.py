"""Experts that live elsewhere: the decoder-side runtime behind the ``offloaded`` experts function.

An ``ExpertRuntime`` is attached to every ``Experts`` module of a decoder whose experts are
not all local. It owns the expert cache, the requests in flight, the optional low-bit shadow
copies, and the counters that the metrics report. It works in one of two phases:

* ``exact`` - the model's own routing; every needed expert is used with its real weights:
  from the cache, from a request already in flight, or fetched now (a miss, and a stall);
* ``draft`` - draft routing: nothing is fetched. Under the ``resident`` draft policy the
  router's choice is restricted to the top-k among resident experts (weights rescaled to the
  unrestricted top-k's mass); a layer with no resident expert then adds no routed output to
  the draft (the cache keeps a share of every layer, so this happens only before a layer's
  experts are first fetched, or when the budget's unpinned part cannot hold one expert per
  layer). Under ``shadow`` a non-resident expert runs
  from its low-bit copy.

Router hooks feed predictions: in draft phase the unrestricted top-k of every draft token is
recorded as the layer's predicted set and requested at once (earliest layers first, so
transfers overlap drafting); with lookahead on, layer l+1's router applied to layer l's
hidden state requests layer l+1's experts while layer l computes.

Letters as in ``specmoe.layers``.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specmoe.config import DRAFT_POLICIES
from specmoe.expert_cache import ExpertCache, Key
from specmoe.layers import Experts, register_experts_function, run_experts
from specmoe.quant import PackedInt4

HOT_WINDOW = 4  # hot draft policy: the exact passes whose expert use chooses the pinned set

# What a source delivers for one expert: (gate_up [2I, H], down [H, I]).
ExpertTensors = tuple[torch.Tensor, torch.Tensor]
FetchFn = Callable[[int, list[int]], dict[int, Future]]


@dataclass
class FetchCounters:
    """What moved and what it cost; the words match ``specmoe.speculative``."""

    bytes_moved: int = 0
    fetch_requests: int = 0  # one per (layer, expert) transfer
    prefetched: int = 0  # requested from a prediction, before verification needed it
    misses: int = 0  # needed by an exact pass, not resident and not in flight: fetched on demand
    stall_s: float = 0.0  # time an exact pass was blocked on transfers: in the source's fetch call or awaiting delivery
    shadow_uses: int = 0  # draft-phase uses of a low-bit copy
    draft_wait_s: float = 0.0  # time a draft was blocked in a source's fetch call (a draft never awaits a delivery)
    remote_computes: int = 0  # misses run on their store instead of being fetched
    remote_activation_bytes: int = 0
    predicted: dict[int, set[int]] = field(default_factory=dict)  # this round, per layer
    needed: dict[int, set[int]] = field(default_factory=dict)  # this round's exact pass, per layer
    true_positives: int = 0
    predicted_total: int = 0
    needed_total: int = 0
    peak_staged_bytes: int = 0  # fetched-but-not-cached plus dequantized shadow copies held (their pool)
    # (requested_at, delivered_at, bytes) per transfer, appended on delivery (any thread); the
    # speculation controller reads them to measure the link's bandwidth and latency
    deliveries: deque = field(default_factory=lambda: deque(maxlen=4096))

    def close_round(self, score: bool) -> None:
        """Score this round's predicted sets against what verification needed (micro-averaged);
        rounds without a draft (prefill, k = 0) predict nothing and are not scored."""
        if score:
            tp, p, n = prediction_counts(self.predicted, self.needed)
            self.true_positives += tp
            self.predicted_total += p
            self.needed_total += n
        self.predicted, self.needed = {}, {}

    @property
    def precision(self) -> float:
        return self.true_positives / self.predicted_total if self.predicted_total else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.needed_total if self.needed_total else 0.0


def _log_delivery(future, requested_at: float, log: deque) -> None:
    """Append (requested_at, delivered_at, bytes) to ``log`` when ``future`` delivers an expert."""
    if not hasattr(future, "add_done_callback"):
        return

    def done(f) -> None:
        if not f.cancelled() and f.exception() is None:
            log.append((requested_at, time.perf_counter(), sum(t.nbytes for t in f.result())))

    future.add_done_callback(done)


def prediction_counts(predicted: dict[int, set[int]], needed: dict[int, set[int]]) -> tuple[int, int, int]:
    """(true positives, predicted, needed) summed over layers, for the layers verification ran."""
    tp = p = n = 0
    for layer, need in needed.items():
        pred = predicted.get(layer, set())
        tp += len(pred & need)
        p += len(pred)
        n += len(need)
    return tp, p, n


class DeviceUploader:
    """Moves fetched weights to the decoder's device and dtype.

    On CUDA a copy goes through pinned host memory on a side stream, so it overlaps the
    compute stream; ``wait()`` orders the compute stream after every copy issued so far. On
    the CPU it is a dtype conversion.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: torch.cuda.Event | None = None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return tensor.to(self.dtype)
        pinned = tensor.pin_memory()
        with torch.cuda.stream(self.stream):
            out = pinned.to(self.device, non_blocking=True).to(self.dtype)
            self.pending = torch.cuda.Event()
            self.pending.record(self.stream)
        out.record_stream(torch.cuda.current_stream(self.device))
        return out

    def wait(self) -> None:
        if self.pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self.pending)
            self.pending = None


class ExpertRuntime:
    """The decoder's view of remote experts: cache, in-flight requests, shadow, phase.

    It has no defaults of its own: ``attach_runtime`` passes ``DecoderConfig``'s.
    """

    def __init__(
        self,
        fetch: FetchFn,
        cache: ExpertCache,
        num_experts: dict[int, int],
        draft_policy: str,
        shadow: dict | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if draft_policy not in DRAFT_POLICIES:
            raise ValueError(f"unknown draft policy {draft_policy!r}; allowed: {', '.join(DRAFT_POLICIES)}")
        if draft_policy == "shadow" and shadow is None:
            raise ValueError("the shadow draft policy needs shadow copies of the experts")
        self.fetch_fn = fetch
        self.cache = cache
        self.num_experts = num_experts  # layer -> experts in that layer
        self.draft_policy = draft_policy
        self.shadow = shadow if shadow is not None else {}  # Key -> (gate_up, down): QuantizedTensor or PackedInt4
        self.shadow_bytes = 0
        self.startup_bytes = 0
        self.total_expert_bytes = 0
        self.device = torch.device(device)
        self.dtype = dtype
        self.upload = DeviceUploader(self.device, dtype)
        self.phase = "exact"
        self.lookahead = False
        self.keep_fetched = True  # False: fetched experts serve their pass and are not cached (static hot set)
        self.affinity: dict[int, dict[int, list[int]]] = {}  # hot policy: layer -> expert -> others, nearest first
        self.hot_experts = 4  # hot policy: pinned experts per layer (attach_runtime passes DecoderConfig's)
        self.recent_use: deque[dict[int, set[int]]] = deque(maxlen=HOT_WINDOW)  # experts the last exact passes used
        self.used: dict[int, set[int]] = {}  # this round's exact pass
        self.hot: dict[int, set[int]] = {}  # this round's hot set per layer
        self.fixed_hot: dict[int, set[int]] = {}  # hot_set global | random: the layer's pinned draft experts, fixed
        self.substitution_rng: torch.Generator | None = None  # substitution random: seeded picks among the pinned
        self.affinity_origin = ""  # where the affinity table came from (prepared, or computed at start-up)
        self.oracle = None  # the overlap mode: a specmoe.trace.OracleReplay
        self.deferred = False  # migration: hold the draft's predictions until verification starts
        self.predicted_waiting: dict[int, set[int]] = {}  # layer -> predicted experts not yet requested
        self.in_flight: dict[Key, Future] = {}
        self.staged: dict[Key, ExpertTensors] = {}  # fetched for the coming exact pass
        self.decoded: OrderedDict[Key, ExpertTensors] = OrderedDict()  # dequantized shadow copies, least recently drafted first
        self.pool_bytes = 0  # what ``decoded`` keeps from one round to the next (build_shadow sets it)
        self.counters = FetchCounters()
        self.next_router: dict[int, torch.nn.Module] = {}  # layer -> router of the next MoE layer
        # remote compute (optional): compute_fn(layer, expert, x [n, H]) -> future of [n, H]
        self.compute_fn = None
        self.always_remote = False  # the remote mode: every miss runs on its store
        self.history = None  # the history mode: a RoutingHistory fed by exact passes, prefetching from it
        self.remote_cost_factor = 4.0  # a remote call costs more than its bytes (latency, store CPU)
        self.hidden_size = self.expert_bytes = 0
        self.item_size = torch.empty((), dtype=dtype).element_size()

    # -- requests -------------------------------------------------------------------------

    def request(self, layer: int, experts: list[int], prefetch: bool) -> None:
        """Ask the source for experts not resident, staged or in flight (one batched request)."""
        wanted = [
            e for e in experts if (layer, e) not in self.cache and (layer, e) not in self.staged and (layer, e) not in self.in_flight
        ]
        if not wanted:
            return
        started = time.perf_counter()
        futures = self.fetch_fn(layer, wanted)
        blocked = time.perf_counter() - started  # a source may block in fetch (in-process reads, asking a store for references)
        if self.phase == "exact":
            self.counters.stall_s += blocked
        else:
            self.counters.draft_wait_s += blocked
        for e in wanted:
            self.in_flight[(layer, e)] = futures[e]
            _log_delivery(futures[e], started, self.counters.deliveries)
        self.counters.fetch_requests += len(wanted)
        self.counters.prefetched += len(wanted) if prefetch else 0

    def end_draft(self) -> None:
        """The draft is over: verification starts. Deferred migration requests the round's
        predicted experts now, one coalesced request per layer, earliest layers first."""
        self.phase = "exact"
        waiting, self.predicted_waiting = self.predicted_waiting, {}
        for layer in sorted(waiting):
            self.request(layer, sorted(waiting[layer]), prefetch=True)

    def _collect(self, keys: list[Key]) -> None:
        """Take the given in-flight requests (waiting only for those not done: a stall) and
        stage their weights on the device."""
        for key in keys:
            future = self.in_flight.pop(key)
            if not future.done():
                started = time.perf_counter()
                future.result()
                self.counters.stall_s += time.perf_counter() - started
            gate_up, down = future.result()
            self.counters.bytes_moved += gate_up.nbytes + down.nbytes
            self.staged[key] = (self.upload(gate_up), self.upload(down))
        self._note_round_bytes()

    def drain(self) -> None:
        """Stage every request that has arrived, without waiting (copies overlap compute)."""
        self._collect([key for key, future in self.in_flight.items() if future.done()])

    def _note_round_bytes(self) -> None:
        held = sum(g.nbytes + d.nbytes for part in (self.staged, self.decoded) for g, d in part.values())
        self.counters.peak_staged_bytes = max(self.counters.peak_staged_bytes, held)

    def predicted_use(self, key: Key) -> float:
        """The cache's priority in speculative modes: how likely the next round is to use ``key``.

        Consecutive positions route alike, so the latest routing predicts the next round best:
        an expert this round's draft predicted, its verification used, or the hot draft policy
        drafts with outranks every other; then the count of the last exact passes that used it.
        Ties keep the eviction policy's order. Read at the end of a round, when fetched experts
        are admitted: the only time the cache evicts.
        """
        layer, expert = key
        latest = any(expert in part.get(layer, ()) for part in (self.counters.predicted, self.used, self.hot))
        return (HOT_WINDOW + 1) * latest + sum(expert in used.get(layer, ()) for used in self.recent_use)

    def admit_staged(self) -> None:
        """End of a round: fetched experts enter the cache (as its policy allows); the pool of
        dequantized shadow copies is trimmed to its budget."""
        for key, (gate_up, down) in self.staged.items() if self.keep_fetched else ():
            self.cache.put(key, (gate_up, down), gate_up.nbytes + down.nbytes)
        self.staged.clear()
        self._trim_pool()
        self.recent_use.append(self.used)
        self.used, self.hot = {}, {}

    def abandon_round(self) -> None:
        """A round failed: forget its requests in flight (some may have failed), what it
        staged and dequantized, and its predictions; the cache keeps what it held."""
        self.in_flight.clear()
        self.staged.clear()
        self.decoded.clear()
        self.counters.predicted, self.counters.needed = {}, {}
        self.predicted_waiting = {}
        self.used, self.hot = {}, {}
        self.phase = "exact"

    # -- setting up -----------------------------------------------------------------------

    def fetch_now(self, layer: int, experts: list[int]) -> dict[int, ExpertTensors]:
        futures = self.fetch_fn(layer, experts)
        out = {}
        for e in experts:
            gate_up, down = futures[e].result()
            self.counters.bytes_moved += gate_up.nbytes + down.nbytes
            out[e] = (self.upload(gate_up), self.upload(down))
        self.upload.wait()
        return out

    def pin(self, ranked: list[Key], max_bytes: int) -> list[Key]:
        """Pin the hottest experts (``ranked`` hottest first) into the cache, up to ``max_bytes``."""

        def load(key: Key):
            gate_up, down = self.fetch_now(key[0], [key[1]])[key[1]]
            return (gate_up, down), gate_up.nbytes + down.nbytes

        return self.cache.pin_hot_set([k for k in ranked if k[0] in self.num_experts], load, max_bytes)

    def build_shadow(self, layers: list[tuple[int, int]], bits: int, group_size: int) -> None:
        """Keep a group-wise ``bits``-bit copy of every expert for drafting.

        On the CPU an int4 copy is kept in the layout of torch's int4 matmul where that kernel
        takes it (``PackedInt4``): the draft multiplies by it directly, so no round dequantizes
        and no dequantized copy is held. Elsewhere (int8, a GPU, a group size the kernel lacks)
        a copy is dequantized when a draft first needs it and kept in a pool of dequantized
        copies as large as the shadow itself (``pool_bytes``), least recently drafted out first.
        """
        from specmoe.quant import pack_int4_for_cpu, quantize

        for layer, count in layers:
            for e, (gate_up, down) in self.fetch_now(layer, list(range(count))).items():
                q = (quantize(gate_up, bits, group_size), quantize(down, bits, group_size))
                packed = tuple(map(pack_int4_for_cpu, q)) if self.device.type == "cpu" else (None,)
                self.shadow[(layer, e)] = q if None in packed else packed
        self.shadow_bytes = sum(a.nbytes + b.nbytes for a, b in self.shadow.values())
        unpacked = not all(isinstance(pair[0], PackedInt4) for pair in self.shadow.values())
        self.pool_bytes = self.shadow_bytes if unpacked else 0  # dequantized copies held: at most the shadow's size again

    # -- weights for one layer's pass -----------------------------------------------------

    def weights(self, layer: int, tokens: dict[int, int]) -> dict | Iterator[tuple[int, object]]:
        """Weights for one layer's pass: ``tokens`` maps each needed expert to its token count.

        Exact phase: (expert, weights) pairs, first the experts that are here (cached, staged,
        or run on their store), then each one still in flight as it arrives. Only this layer's
        experts are waited for; later layers' transfers continue meanwhile.
        """
        experts = list(tokens)
        if self.phase == "draft":
            return {e: self._draft_weights((layer, e)) for e in experts}
        self.counters.needed.setdefault(layer, set()).update(experts)
        self.used.setdefault(layer, set()).update(experts)
        out = {}
        for e in experts:
            hit = self.cache.get((layer, e))
            if hit is not None:
                out[e] = hit
        missing = [e for e in experts if e not in out and (layer, e) not in self.staged and (layer, e) not in self.in_flight]
        self.counters.misses += len(missing)
        for e in [e for e in missing if self._compute_remotely(tokens[e])]:
            out[e] = self._remote(layer, e)
            missing.remove(e)
        self.request(layer, missing, prefetch=False)
        arriving = [e for e in experts if e not in out and (layer, e) in self.in_flight]
        out.update({e: self.staged[(layer, e)] for e in experts if e not in out and e not in arriving})
        return self._here_then_arriving(layer, out, arriving)

    def _here_then_arriving(self, layer: int, here: dict, arriving: list[int]) -> Iterator[tuple[int, object]]:
        """The experts that are here, then those in flight in the order they arrive; blocking
        until the next one arrives is a stall."""
        self.upload.wait()
        yield from here.items()
        waiting = {e: self.in_flight[(layer, e)] for e in arriving}  # in request order
        while waiting:
            done = [e for e, future in waiting.items() if future.done()]
            if not done:
                started = time.perf_counter()
                first = await_next(list(waiting.values()))
                self.counters.stall_s += time.perf_counter() - started
                done = [e for e, future in waiting.items() if future.done()] or [list(waiting)[first]]
            self._collect([(layer, e) for e in done])
            self.upload.wait()
            for e in done:
                del waiting[e]
                yield e, self.staged[(layer, e)]

    def _compute_remotely(self, tokens: int) -> bool:
        """The cost model: moving the activations there and back costs less than moving the weights."""
        if self.compute_fn is None:
            return False
        if self.always_remote:
            return True
        activation_bytes = 2 * tokens * self.hidden_size * self.item_size
        return activation_bytes * self.remote_cost_factor < self.expert_bytes

    def _remote(self, layer: int, expert: int):
        def run(x: torch.Tensor):
            self.counters.remote_computes += 1
            self.counters.remote_activation_bytes += 2 * x.nbytes
            return self.compute_fn(layer, expert, x.to("cpu"))

        return run

    def _draft_weights(self, key: Key) -> ExpertTensors | None:
        resident = self.cache.peek(key)
        if resident is not None:
            return resident
        if key in self.in_flight and self.in_flight[key].done():
            self._collect([key])  # arrived already: draft with the exact weights, at no wait
            self.upload.wait()  # the compute stream waits for the copy (a device-side wait, not a host one)
        if key in self.staged:
            return self.staged[key]
        if self.draft_policy == "shadow":
            self.counters.shadow_uses += 1
            if isinstance(self.shadow[key][0], PackedInt4):
                return self.shadow[key]  # multiplied in its packed form (run_experts): nothing to dequantize
            return self._dequantized(key)
        return None  # resident policy: only reachable with weight 0 (fewer resident than top-k)

    def _dequantized(self, key: Key) -> ExpertTensors:
        """A shadow copy that is not packed, dequantized; kept in a pool across rounds (up to
        ``pool_bytes``, trimmed least recently drafted first at the end of a round, never
        within one), so a round pays only for copies the pool does not hold."""
        if key in self.decoded:
            self.decoded.move_to_end(key)
        else:
            gate_up, down = self.shadow[key]
            self.decoded[key] = (gate_up.dequantize(self.dtype), down.dequantize(self.dtype))
            self._note_round_bytes()
        return self.decoded[key]

    def _trim_pool(self) -> None:
        held = sum(g.nbytes + d.nbytes for g, d in self.decoded.values())
        while held > self.pool_bytes:
            _, (gate_up, down) = self.decoded.popitem(last=False)
            held -= gate_up.nbytes + down.nbytes

    # -- the hot draft policy -------------------------------------------------------------

    def _available(self, key: Key) -> bool:
        return self.cache.peek(key) is not None or key in self.staged or (key in self.in_flight and self.in_flight[key].done())

    def hot_set(self, layer: int) -> set[int]:
        """The layer's pinned draft experts this round: the ``hot_experts`` resident ones the last
        exact passes used most (ties: lower id). Chosen among experts already here: moves no bytes.
        With a fixed set (hot_set global or random, pinned at start-up): its resident members."""
        if layer in self.fixed_hot:
            return self.fixed_hot[layer] & self.cache.resident(layer)
        if layer not in self.hot:
            uses = Counter(e for used in self.recent_use for e in used.get(layer, ()))
            resident = sorted(self.cache.resident(layer), key=lambda e: (-uses[e], e))
            self.hot[layer] = set(resident[: self.hot_experts])
        return self.hot[layer]

    def substitute(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """Draft routing of the hot policy: a pick whose exact weights are not here becomes its
        nearest pinned expert (the router's weight is kept by the caller); with a substitution
        generator, a seeded random pinned expert instead. [N, K] -> [N, K]"""
        hot = self.hot_set(layer)
        table = [e if not hot or self._available((layer, e)) else self._substitute_for(layer, e, hot)
                 for e in range(self.num_experts[layer])]
        return torch.tensor(table, device=indices.device)[indices]

    def _substitute_for(self, layer: int, expert: int, hot: set[int]) -> int:
        if self.substitution_rng is not None:
            pool = sorted(hot)
            return pool[int(torch.randint(len(pool), (), generator=self.substitution_rng))]
        return next(o for o in self.affinity[layer][expert] if o in hot)

    # -- router hooks ---------------------------------------------------------------------

    def route(self, router, x, logits, weights, indices):
        """The hook on every router: predictions in draft phase, lookahead in exact phase."""
        self.drain()
        if self.phase == "draft":
            predicted = sorted(set(indices.reshape(-1).tolist()))  # sync: a prediction must reach the host to be requested
            self.counters.predicted.setdefault(router.layer, set()).update(predicted)
            if self.deferred:
                self.predicted_waiting.setdefault(router.layer, set()).update(predicted)
            else:
                self.request(router.layer, predicted, prefetch=True)
            if self.draft_policy == "hot":
                indices = self.substitute(router.layer, indices)
            elif self.draft_policy == "resident":
                allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # [E]
                allowed[list(self.cache.resident(router.layer))] = True
                weights, indices = router.select(logits, allowed)
        elif self.oracle is not None:
            self.oracle.route(self, router.layer, indices)
        elif self.history is not None:
            self._prefetch_from_history(router.layer, indices)
        elif self.lookahead and not self.always_remote and router.layer in self.next_router:
            nxt = self.next_router[router.layer]
            _, ahead = nxt.select(F.linear(x, nxt.weight))  # [N, K]
            self.request(nxt.layer, sorted(set(ahead.reshape(-1).tolist())), prefetch=True)  # sync: see above
        return logits, weights, indices


    def _prefetch_from_history(self, layer: int, indices: torch.Tensor) -> None:
        """Record this exact pass's routing, then request the next two MoE layers' likeliest
        experts given it (as many per layer as this layer uses now)."""
        self.history.observe(layer, indices)  # sync: inside, the history lives on the host
        current = sorted(set(self.history.last[layer].reshape(-1).tolist()))
        for nxt, experts in self.history.predict(layer, current, depth=2, width=len(current)).items():
            self.request(nxt, experts, prefetch=True)


@register_experts_function("offloaded")
def offloaded_experts(experts: Experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Each expert's weights come from the attached ``ExpertRuntime``."""
    return run_experts(
        experts, hidden_states, top_k_index, top_k_weights, lambda tokens: experts.runtime.weights(experts.layer, tokens)
    )


def await_next(futures: list) -> int:
    """Block until one of ``futures`` is done; returns the index of one that is. Concurrent
    futures: the first to complete. Others (a source's own future type, with ``done`` and
    ``result``): the earliest requested, which a FIFO link delivers first."""
    if all(isinstance(f, Future) for f in futures):
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return next(i for i, f in enumerate(futures) if f in done)
    futures[0].result()  # raises its error, if it failed: the pass fails as any failed fetch does
    return 0


def completed(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def checkpoint_fetcher(model_dir) -> FetchFn:
    """An in-process source: experts read from the checkpoint directory when requested.

    ``fetch`` returns at once; a small thread pool reads (``CheckpointSource``), so a draft
    runs on the shadow copy while exact experts are in flight.
    """
    from specmoe.expert_source import CheckpointSource

    return CheckpointSource(model_dir)


def _set_up_hot(runtime: ExpertRuntime, model, fetch, config) -> None:
    """The hot draft policy's pinned sets and substitution.

    hot_set temporal chooses from recent use each round; global and random fix the set now
    and pin it in the cache (moving those experts once). Affinity substitution takes the
    table from ``config.affinity`` or the source (a prepared directory's, computed by
    ``specmoe prepare``); without either it is computed here, and says so (the default
    router distance reads only the router weights; the others move every expert once).
    """
    import random

    n = runtime.hot_experts
    if config.hot_set == "global":
        from specmoe.profile import RoutingProfile

        ranked = RoutingProfile.load(config.profile).ranked()
        runtime.fixed_hot = {layer: set([e for l, e in ranked if l == layer][:n]) for layer in runtime.num_experts}
    elif config.hot_set == "random":
        rng = random.Random(0)
        runtime.fixed_hot = {layer: set(rng.sample(range(count), min(n, count))) for layer, count in sorted(runtime.num_experts.items())}
    if runtime.fixed_hot:
        runtime.pin([(layer, e) for layer, hot in sorted(runtime.fixed_hot.items()) for e in sorted(hot)], runtime.cache.budget)
    if config.substitution == "random":
        runtime.substitution_rng = torch.Generator().manual_seed(0)
        return
    table = _prepared_affinity(fetch, config)
    if table is not None:
        runtime.affinity, runtime.affinity_origin = table.layers, f"prepared ({table.distance} distance)"
        return
    import sys

    from specmoe.affinity import DEFAULT_DISTANCE, READS_NO_EXPERT, expert_affinity, layer_context

    reads = DEFAULT_DISTANCE not in READS_NO_EXPERT
    print("[specmoe] no prepared affinity table (none configured, and the source carries none): computing "
          f"it at start-up ({DEFAULT_DISTANCE} distance{', moving every expert once' if reads else ', from the router weights'})",
          file=sys.stderr)
    params, act = dict(model.named_parameters()), getattr(model.config, "hidden_act", "silu")
    for layer, count in sorted(runtime.num_experts.items()):
        weights = runtime.fetch_now(layer, list(range(count))) if reads else dict.fromkeys(range(count))
        runtime.affinity[layer] = expert_affinity(weights, DEFAULT_DISTANCE, layer_context(params, layer, act))
    runtime.affinity_origin = f"computed at start-up ({DEFAULT_DISTANCE} distance)"


def _prepared_affinity(fetch, config):
    """The affinity table named by ``config.affinity`` (an AffinityTable, a prepared directory or
    an affinity.json), else the source's (a source over a prepared directory may carry one)."""
    from specmoe.affinity import AffinityTable, load_affinity

    if isinstance(config.affinity, AffinityTable):
        return config.affinity
    if config.affinity is not None:
        return load_affinity(config.affinity)
    table = getattr(fetch, "affinity", None)
    return table if isinstance(table, AffinityTable) else None


def attach_runtime(model, fetch: FetchFn, config, device: torch.device | str = "cpu", compute=None) -> ExpertRuntime:
    """Make ``model``'s experts remote: attach one ExpertRuntime to every MoE layer.

    Sizes the cache from ``config.cache_budget``, pins the routing profile's hottest experts,
    and (shadow draft policy) builds the low-bit copies; with ``config.remote_compute`` a miss
    with few tokens runs on its store through ``compute``. Bytes moved while setting up are
    kept apart from the run's counters (``runtime.startup_bytes``).
    """
    blocks = model.moe_blocks()
    dtype = next(model.parameters()).dtype
    hidden = model.config.hidden_size
    item = torch.empty((), dtype=dtype).element_size()
    expert_bytes = {layer: 3 * b.experts.intermediate_size * hidden * item for layer, b in blocks}
    total = sum(expert_bytes[layer] * b.experts.num_experts for layer, b in blocks)
    budget = config.budget_bytes(total)
    # every layer keeps a share: up to top-k experts each, as many as the budget holds for all layers
    slots = budget // max(expert_bytes.values())
    floor = min(min(b.gate.top_k for _, b in blocks), slots // len(blocks))
    cache = ExpertCache(budget, config.eviction, layer_floor=floor)
    use_shadow = config.speculative and config.draft_policy == "shadow"
    runtime = ExpertRuntime(
        fetch,
        cache,
        {layer: b.experts.num_experts for layer, b in blocks},
        config.draft_policy if config.speculative else "resident",  # other modes never draft
        {} if use_shadow else None,
        device,
        dtype,
    )
    runtime.total_expert_bytes = total
    runtime.deferred = config.migration == "deferred"
    runtime.hot_experts = config.hot_experts
    runtime.hidden_size = hidden
    runtime.expert_bytes = min(expert_bytes.values())
    if config.remote_compute or config.mode_spec.remote:
        if compute is None:
            what = f"mode {config.mode!r}" if config.mode_spec.remote else "remote_compute"
            raise ValueError(f"{what} needs a source that can run experts on their store (the grpc transport)")
        runtime.compute_fn = compute
        runtime.always_remote = config.mode_spec.remote
    if config.mode_spec.history:
        from specmoe.history import RoutingHistory

        runtime.history = RoutingHistory(runtime.num_experts)
        cache.priority = runtime.history.priority  # admission and eviction by recent activation share
    elif config.speculative:
        cache.priority = runtime.predicted_use  # admission and eviction by the latest routing, then recent use
    for (layer, block), nxt in zip(blocks, blocks[1:] + [(None, None)]):
        block.experts.implementation = "offloaded"
        block.experts.runtime = runtime
        block.gate.add_hook(runtime.route)
        if nxt[1] is not None:
            runtime.next_router[layer] = nxt[1].gate
    if config.profile is not None:
        from specmoe.profile import RoutingProfile

        ranked = RoutingProfile.load(config.profile).ranked()
        static = config.mode_spec.static_hot
        if static is not None:  # a static hot set: this share of all experts, whatever the budget
            count = max(1, round(static * sum(runtime.num_experts.values())))
            runtime.cache = cache = ExpertCache(count * max(expert_bytes.values()), config.eviction)
            runtime.keep_fetched = False
            runtime.pin(ranked[:count], cache.budget)
        else:
            runtime.pin(ranked, int(config.pinned_fraction * cache.budget))
    if use_shadow:
        runtime.build_shadow([(layer, b.experts.num_experts) for layer, b in blocks], config.shadow_bits, config.shadow_group_size)
    if config.speculative and config.draft_policy == "hot":
        _set_up_hot(runtime, model, fetch, config)
    if config.mode_spec.oracle:
        from specmoe.trace import OracleReplay, RoutingTrace

        runtime.oracle = OracleReplay(RoutingTrace.load(config.trace), [layer for layer, _ in blocks])
    runtime.startup_bytes = runtime.counters.bytes_moved
    runtime.counters = FetchCounters()
    return runtime
