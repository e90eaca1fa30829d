"""Where a decoder's experts come from: one interface, several transports.

    source.fetch(layer, experts) -> {expert: future of (gate_up [2I, H], down [H, I])}

A source is also callable with the same arguments, so it can be handed to the engine as
its ``fetch`` function. All experts of one call are requested together and can be awaited
once. Every source counts bytes, requests and latency in a ``TransportMetrics`` and checks
received bytes against the manifest's CRC-32 unless ``verify=False``.

The in-process transports, ``LocalSource`` (prepared shards) and ``CheckpointSource`` (a
checkpoint directory), live here; they return at once and read on a small thread pool, like
every other source. The ones that cross processes need Ray or gRPC and live in
``actors/``: ``RaySource`` (``actors/ray_source.py``) and ``GrpcSource``
(``actors/grpc_source.py``). Any source can be put behind an emulated link
(``specmoe.link.EmulatedLink``).
"""

from __future__ import annotations

import bisect
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from specmoe.shards import EXPERT_TENSORS, CorruptShardError, ShardReader

ExpertTensors = tuple[torch.Tensor, torch.Tensor]
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExpertUnavailableError(RuntimeError):
    """No store that holds an expert answered."""


@dataclass
class TransportMetrics:
    """Bytes, requests and the latency histogram of one source (thread-safe)."""

    bytes: int = 0
    requests: int = 0  # one per expert requested
    calls: int = 0  # one per round trip to a store
    failovers: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, nbytes: int, experts: int, seconds: float, calls: int = 1) -> None:
        """``experts`` delivered in ``seconds`` (latency of the request that carried them)."""
        with self._lock:
            self.bytes += nbytes
            self.requests += experts
            self.calls += calls
            self.latency_sum_s += seconds
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, seconds * 1000)] += 1

    def snapshot(self) -> dict:
        with self._lock:
            buckets = [f"<={b}ms" for b in LATENCY_BUCKETS_MS] + ["inf"]
            return {
                "bytes": self.bytes,
                "requests": self.requests,
                "calls": self.calls,
                "failovers": self.failovers,
                "mean_latency_ms": 1000 * self.latency_sum_s / sum(self.latency_counts) if self.calls else 0.0,
                "latency_histogram": dict(zip(buckets, self.latency_counts)),
            }


class ExpertSource(Protocol):
    metrics: TransportMetrics

    def fetch(self, layer: int, experts: list[int]) -> dict[int, Future]: ...

    def close(self) -> None: ...


def check_crc(data, expected: int, what: str) -> None:
    if zlib.crc32(data) != expected:
        raise CorruptShardError(f"{what}: received bytes do not match the manifest checksum")


def tensor_from_bytes(data, dtype: str, shape: list[int]) -> torch.Tensor:
    if dtype not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype!r} on the wire; allowed: {sorted(DTYPES)}")
    return torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)


class BackgroundReads:
    """A source that reads in-process on a small thread pool: ``fetch`` returns at once and
    each expert's future completes when it has been read (and checked), so a draft can run
    on the shadow copy while exact experts are in flight.

    The reads do no torch compute (file bytes, CRC-32, views): torch work on another thread
    would start its own OpenMP team, whose spinning slows the decoder's compute.
    """

    def __init__(self, workers: int = 2):
        self.metrics = TransportMetrics()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="specmoe-read")

    def read(self, layer: int, expert: int) -> ExpertTensors:
        raise NotImplementedError

    def fetch(self, layer: int, experts: list[int]) -> dict[int, Future]:
        futures: dict[int, Future] = {e: Future() for e in experts}
        self.pool.submit(self._deliver, layer, experts, futures, time.perf_counter())
        return futures

    def __call__(self, layer: int, experts: list[int]) -> dict[int, Future]:
        return self.fetch(layer, experts)

    def _deliver(self, layer: int, experts: list[int], futures: dict[int, Future], started: float) -> None:
        for i, e in enumerate(experts):
            try:
                pair = self.read(layer, e)
            except Exception as err:  # noqa: BLE001 -- the caller's future raises it
                futures[e].set_exception(err)
                continue
            self.metrics.record(pair[0].nbytes + pair[1].nbytes, 1, time.perf_counter() - started, calls=int(i == 0))
            futures[e].set_result(pair)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class LocalSource(BackgroundReads):
    """Experts read in-process from a prepared directory (checksums checked on read, in the background)."""

    def __init__(self, shard_dir, verify: bool = True, workers: int = 2):
        self.reader = ShardReader(shard_dir)
        self.verify = verify
        super().__init__(workers)

    def read(self, layer: int, expert: int) -> ExpertTensors:
        return self.reader.read(layer, expert, self.verify)


class CheckpointSource(BackgroundReads):
    """Experts read in-process from a Hugging Face checkpoint directory, in the background."""

    def __init__(self, model_dir, workers: int = 2):
        from specmoe.loader import read_config
        from specmoe.models import model_class
        from specmoe.weights import Checkpoint, ExpertReader

        table = model_class(read_config(model_dir).model_type).checkpoint_names
        self.reader = ExpertReader(Checkpoint(model_dir), table)
        super().__init__(workers)

    def read(self, layer: int, expert: int) -> ExpertTensors:
        return self.reader.read(layer, expert)

