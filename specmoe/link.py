"""An emulated link between a decoder and its experts: a bandwidth, a latency, a FIFO queue.

    source = EmulatedLink(LocalSource(shards), LinkConfig(gbps=2.0, latency_us=50))

wraps any expert source (``LocalSource``, the checkpoint reader, ``RaySource``,
``GrpcSource``) and keeps its interface: ``fetch(layer, experts) -> {expert: Future}``,
``__call__``, ``metrics``, ``close``, and ``compute`` / ``refresh`` when the source has them.
It puts the regime of a real deployment (experts in host memory behind PCIe, or on a store
node behind a network) on a machine whose own link is fast next to its compute.

The model of the link, per transfer (one expert, or one remote computation's activations):

* a ``fetch`` call is one request: its experts are ready to cross the link ``latency_us``
  after the call, and not before the source behind has delivered them; latency is not link
  time, so requests in flight overlap their latencies, as on PCIe or a network;
* the link carries one transfer at a time, ``bytes / bandwidth`` seconds each, in the order
  the experts were requested (FIFO, head-of-line blocking included);
* an expert is delivered (its future completes) when its transfer ends, on the link's own
  thread, so compute overlaps transfers as it does with a real link.

Queueing discipline (``LinkConfig.queue``): ``"decoder"`` (the default) is one FIFO for
everything one decoder asks for: one wrapper is one decoder's link. ``"store"`` is one FIFO
per store (an expert's primary owner in the source's ``owners``): links to different stores
carry in parallel.

``metrics.snapshot()`` is the source's ``TransportMetrics`` snapshot plus ``link_bytes``,
``link_transfers``, ``link_busy_s`` (time the link carried bytes) and ``link_utilisation``
(busy time over wall time since the first request, per queue): near 1, the run is at the
link's physical limit.

``link_for_r`` sets the bandwidth from R, the time to move one token's active expert bytes
over the link divided by one resident decode step at batch 1 (measured here).
"""

from __future__ import annotations

import math
import queue
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from specmoe.expert_source import TransportMetrics

QUEUES = ("decoder", "store")


def _number(value, name: str, allowed: str, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class LinkConfig:
    """gbps: bandwidth in gigabytes per second (1e9 bytes/s); None: no bandwidth limit.
    latency_us: per request (one ``fetch`` call), in microseconds. queue: "decoder" | "store"."""

    gbps: float | None = None
    latency_us: float = 0.0
    queue: str = "decoder"

    def __post_init__(self):
        if self.gbps is not None:
            _number(self.gbps, "link gbps", "a finite number of gigabytes per second > 0 (or None: no limit)", True)
        _number(self.latency_us, "link latency_us", "a finite number of microseconds >= 0", False)
        if self.queue not in QUEUES:
            raise ValueError(f"link queue must be one of {', '.join(QUEUES)}, got {self.queue!r}")

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / (self.gbps * 1e9) if self.gbps else 0.0


@dataclass
class LinkMetrics:
    """The source's transport metrics and the link's own counters (thread-safe)."""

    transport: TransportMetrics
    bytes: int = 0
    transfers: int = 0
    busy_s: float = 0.0  # scheduled: includes transfers still under way
    first_use: float | None = None
    free_at: dict = field(default_factory=dict)  # queue key -> when its last scheduled transfer ends
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getattr__(self, name: str):  # failovers, requests, ... of the source behind
        if name == "transport":
            raise AttributeError(name)
        return getattr(self.transport, name)

    def started(self, now: float) -> None:
        with self._lock:
            if self.first_use is None:
                self.first_use = now

    def carried(self, key, nbytes: int, start: float, end: float) -> None:
        with self._lock:
            self.bytes += nbytes
            self.transfers += 1
            self.busy_s += end - start
            self.free_at[key] = max(end, self.free_at.get(key, 0.0))

    def busy_until(self, now: float) -> float:
        """Busy time up to ``now``: what is scheduled past it has not been carried yet."""
        with self._lock:
            ahead = sum(max(0.0, end - now) for end in self.free_at.values())
            return max(0.0, self.busy_s - ahead)

    def snapshot(self) -> dict:
        now = time.perf_counter()
        busy = self.busy_until(now)
        wall = now - self.first_use if self.first_use is not None else 0.0
        queues = max(1, len(self.free_at))
        utilisation = min(1.0, busy / (wall * queues)) if wall > 0 else 0.0
        return self.transport.snapshot() | {
            "link_bytes": self.bytes,
            "link_transfers": self.transfers,
            "link_busy_s": busy,
            "link_utilisation": utilisation,
        }


@dataclass
class _Transfer:
    inner: object  # a future (or anything with done() and result()) from the source behind
    outer: Future
    ready_at: float  # the request's latency elapsed
    size: Callable[[object], int]  # bytes the delivered value moved
    done_at: list = field(default_factory=list)  # when the source delivered, if it says so


class _Lane:
    """One FIFO queue and the thread that carries its transfers."""

    def __init__(self, key, config: LinkConfig, metrics_of: Callable[[], LinkMetrics]):
        self.key, self.config, self.metrics_of = key, config, metrics_of
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.free_at = 0.0
        self.thread = threading.Thread(target=self._run, name=f"specmoe-link-{key}", daemon=True)
        self.thread.start()

    def put(self, transfer: _Transfer) -> None:
        if hasattr(transfer.inner, "add_done_callback"):
            transfer.inner.add_done_callback(lambda _: transfer.done_at.append(time.perf_counter()))
        self.queue.put(transfer)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5.0)

    def _run(self) -> None:
        while (transfer := self.queue.get()) is not None:
            self._carry(transfer)

    def _carry(self, t: _Transfer) -> None:
        was_done = t.inner.done()
        try:
            value = t.inner.result()
        except BaseException as err:  # the source's error reaches the caller at once: it moved nothing
            t.outer.set_exception(err)
            return
        arrived = t.done_at[0] if t.done_at else (t.ready_at if was_done else time.perf_counter())
        start = max(t.ready_at, arrived, self.free_at)
        nbytes = t.size(value)
        end = start + self.config.transfer_s(nbytes)
        self.free_at = end
        self.metrics_of().carried(self.key, nbytes, start, end)
        delay = end - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t.outer.set_result(value)


def _pair_bytes(pair) -> int:
    return sum(t.nbytes for t in pair)


class EmulatedLink:
    """``source`` behind an emulated link (see the module docstring); a source itself."""

    def __init__(self, source, config: LinkConfig):
        if not isinstance(config, LinkConfig):
            raise ValueError(f"config must be a LinkConfig, got {type(config).__name__}")
        fetch = getattr(source, "fetch", source)
        if not callable(fetch):
            raise ValueError(f"an emulated link needs a source with fetch(layer, experts), got {type(source).__name__}")
        owners = getattr(source, "owners", None)
        if config.queue == "store" and not owners:
            raise ValueError(f"link queue 'store' needs a source that knows which store holds each expert "
                             f"(RaySource, GrpcSource), got {type(source).__name__}; use queue 'decoder'")
        self.source, self.config, self._fetch, self._owners = source, config, fetch, owners
        inner = getattr(source, "metrics", None)
        self._metrics = LinkMetrics(inner if inner is not None else TransportMetrics())
        self._lanes: dict = {}
        self._lock = threading.Lock()
        self._pending = 0  # transfers requested and not yet delivered
        self._idle = threading.Condition(self._lock)

    # -- the source interface ---------------------------------------------------------------

    def fetch(self, layer: int, experts: list[int]) -> dict[int, Future]:
        requested = time.perf_counter()
        self._metrics.started(requested)
        inner = self._fetch(layer, experts)
        out = {}
        for e in experts:
            out[e] = self._enqueue(self._queue_key(layer, e), inner[e], requested, _pair_bytes)
        return out

    def __call__(self, layer: int, experts: list[int]) -> dict[int, Future]:
        return self.fetch(layer, experts)

    @property
    def affinity(self):
        """The hot draft policy's affinity table: the source's (None when it carries none)."""
        return getattr(self.source, "affinity", None)

    @affinity.setter
    def affinity(self, table) -> None:
        self.source.affinity = table  # a deployment hands its prepared table to the source behind

    @property
    def compute(self):
        """The source's remote compute, its activations (there and back) carried by the link.
        AttributeError when the source behind cannot compute."""
        inner = self.source.compute

        def compute(layer: int, expert: int, x):
            requested = time.perf_counter()
            self._metrics.started(requested)
            return self._enqueue(self._queue_key(layer, expert), inner(layer, expert, x), requested,
                                 lambda y: x.nbytes + y.nbytes)

        return compute

    @property
    def refresh(self):
        """The source's ``refresh`` (AttributeError when it has none)."""
        return self.source.refresh

    @property
    def owners(self):
        return self._owners

    @property
    def metrics(self) -> LinkMetrics:
        return self._metrics

    @metrics.setter
    def metrics(self, value: LinkMetrics) -> None:
        """Adopt another link's metrics (a decoder rebuilding its source keeps counting)."""
        self._metrics = value
        if hasattr(self.source, "metrics"):
            self.source.metrics = value.transport

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every transfer requested so far has been delivered (a benchmark starts
        each run on an idle link); False if ``timeout_s`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.close()
        if hasattr(self.source, "close"):
            self.source.close()

    # -- queues -----------------------------------------------------------------------------

    def _queue_key(self, layer: int, expert: int):
        if self.config.queue == "decoder":
            return "decoder"
        owners = self._owners.get((layer, expert))
        return f"store{owners[0]}" if owners else "decoder"

    def _enqueue(self, key, inner, requested: float, size) -> Future:
        outer: Future = Future()
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(key, self.config, lambda: self._metrics)
            self._pending += 1
        outer.add_done_callback(self._delivered)
        lane.put(_Transfer(inner, outer, requested + self.config.latency_s, size))
        return outer

    def _delivered(self, _: Future) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()


# -- setting the bandwidth from R ---------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What ``link_for_r`` measured: bandwidth = active_bytes / (r * step_s)."""

    r: float
    step_s: float  # one resident decode step at batch 1, on this machine
    active_bytes: int  # one token's active expert bytes: top-k experts x MoE layers x bytes per expert

    @property
    def gbps(self) -> float:
        return self.active_bytes / (self.r * self.step_s) / 1e9


def active_expert_bytes(model_dir: str | Path) -> int:
    """Bytes of the experts one token uses: top-k per MoE layer, each as the checkpoint stores it
    (what a source moves)."""
    from specmoe.loader import read_config
    from specmoe.models import model_class
    from specmoe.weights import Checkpoint, ExpertReader

    config = read_config(model_dir)
    reader = ExpertReader(Checkpoint(model_dir), model_class(config.model_type).checkpoint_names)
    top_k = config.num_experts_per_tok
    return sum(top_k * _pair_bytes(reader.read(layer, 0)) for layer in reader.layers)


def resident_step_s(model_dir: str | Path, dtype: str = "fp32", device: str = "cpu", steps: int = 8) -> float:
    """The median time of one decode step at batch 1 with every expert resident."""
    from specmoe.config import EngineConfig
    from specmoe.engine import Engine
    from specmoe.sampling import SamplingParams

    engine = Engine(EngineConfig(model=model_dir, dtype=dtype, device=device, max_batch_size=1))
    engine.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=steps + 2, ignore_eos=True))
    engine.step()  # prefill
    times = []
    while engine.has_unfinished():
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def link_for_r(model_dir: str | Path, r: float, dtype: str = "fp32", device: str = "cpu") -> Calibration:
    """Measure this machine's resident step and the model's active expert bytes for a link at R."""
    _number(r, "link R", "a finite number > 0 (transfer time of a token's active experts / resident step)", True)
    return Calibration(r, resident_step_s(model_dir, dtype, device), active_expert_bytes(model_dir))
