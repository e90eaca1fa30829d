"""The gRPC transport: ``GrpcSource`` streams experts from ``ExpertService`` servers.

Same interface as every source (``specmoe.expert_source``): ``fetch(layer, experts)``
returns one future per expert, all requested together.

Each call's deadline follows from what it moves: ``deadline_s`` plus its bytes (from the
manifest) at ``floor_bytes_per_s``, the slowest rate a healthy store is expected to keep,
so a hung store costs about that much once rather than a flat 30 s. Each store has a
circuit breaker: a store whose call failed (UNAVAILABLE, DEADLINE_EXCEEDED) is skipped for
``retry_after_s``, its experts coming from a replica at once; after that, one ``Health``
call with a ``probe_timeout_s`` deadline decides whether it is back.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from specmoe.expert_source import DTYPES, ExpertUnavailableError, TransportMetrics, check_crc, tensor_from_bytes
from specmoe.shards import EXPERT_TENSORS
from specmoe.tensor_wire import decode_chunk

FETCH_METHOD = "/specmoe.ExpertService/Fetch"


def _serialize(message) -> bytes:
    return message.SerializeToString()


@dataclass
class GrpcConfig:
    """How a client reaches stores: bearer token, TLS root certificate, chunk size, deadlines."""

    token: str | None = field(default=None, repr=False)
    root_cert: bytes | None = None  # PEM; None = plaintext
    server_name: str | None = None  # TLS name override (e.g. "localhost" for a test certificate)
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 64 << 20
    deadline_s: float = 2.0  # every call's fixed allowance (connection, first byte)
    floor_bytes_per_s: float = 32e6  # a call moving n bytes may take deadline_s + n / floor_bytes_per_s
    retry_after_s: float = 5.0  # a store whose call failed is skipped this long, then probed
    probe_timeout_s: float = 1.0  # the probe's (Health) deadline
    workers: int = 4

    def __post_init__(self):
        for name in ("deadline_s", "floor_bytes_per_s", "retry_after_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(f"workers must be an integer >= 1, got {self.workers!r}")

    def deadline(self, nbytes: int) -> float:
        """Seconds a call that moves ``nbytes`` may take."""
        return self.deadline_s + nbytes / self.floor_bytes_per_s


def grpc_channel(address: str, cfg: GrpcConfig):
    import grpc

    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
    ]
    if cfg.root_cert is None:
        return grpc.insecure_channel(address, options=options)
    if cfg.server_name:
        options.append(("grpc.ssl_target_name_override", cfg.server_name))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=cfg.root_cert), options=options)


class CircuitBreaker:
    """Remembers that a store failed: closed (use it), open (skip it for ``retry_after_s``), then
    one caller probes it (half-open) while the others keep skipping it. Thread-safe."""

    def __init__(self, retry_after_s: float):
        self.retry_after_s = retry_after_s
        self.failures = 0  # consecutive
        self.opened_at: float | None = None  # time.monotonic() of the last failure or failed probe
        self.lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def allows(self, probe) -> bool:
        """Whether to call the store now; ``probe()`` (-> bool) is called when a retry is due."""
        with self.lock:
            if self.opened_at is None:
                return True
            if time.monotonic() - self.opened_at < self.retry_after_s:
                return False
            self.opened_at = time.monotonic()  # this caller probes; the others keep skipping
        if probe():
            self.succeeded()
            return True
        self.failed()
        return False

    def succeeded(self) -> None:
        with self.lock:
            self.failures, self.opened_at = 0, None

    def failed(self) -> None:
        with self.lock:
            self.failures += 1
            self.opened_at = time.monotonic()


class GrpcSource:
    """Experts streamed from one or more ``ExpertService`` servers.

    ``owners`` maps (layer, expert) to the indices of the addresses that hold it, primary
    first (from placement, or learned from each server's Manifest when not given). A call
    that fails with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED is retried on the
    next replica; the first two also open the store's circuit breaker.
    """

    def __init__(self, addresses: list[str], cfg: GrpcConfig | None = None, verify: bool = True, owners=None):
        from protos import expert_service_pb2_grpc as pb2_grpc

        self.cfg = cfg or GrpcConfig()
        self.verify = verify
        self.metrics = TransportMetrics()
        self.addresses = list(addresses)
        self.channels = [grpc_channel(a, self.cfg) for a in self.addresses]
        self.stubs = [pb2_grpc.ExpertServiceStub(c) for c in self.channels]
        # Fetch replies stay serialized: decode_chunk reads them without copying the payload
        self.fetch_calls = [c.unary_stream(FETCH_METHOD, request_serializer=_serialize) for c in self.channels]
        self.breakers = [CircuitBreaker(self.cfg.retry_after_s) for _ in self.addresses]
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.workers, thread_name_prefix="grpc-fetch")
        self.info: dict[tuple[int, int, str], object] = {}  # (layer, expert, name) -> TensorInfo
        self.info_lock = threading.Lock()
        self.owners = owners if owners is not None else self._learn_owners()

    def _metadata(self):
        return (("authorization", f"Bearer {self.cfg.token}"),) if self.cfg.token else ()

    def manifest(self, index: int):
        from protos import expert_service_pb2 as pb2

        reply = self.stubs[index].Manifest(pb2.ManifestRequest(), metadata=self._metadata(), timeout=self.cfg.deadline_s)
        with self.info_lock:
            self.info.update({(t.layer, t.expert, t.name): t for t in reply.tensors})
        return reply

    def _learn_owners(self) -> dict[tuple[int, int], tuple[int, ...]]:
        owners: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self.stubs)):
            for t in self.manifest(i).tensors:
                if i not in owners.setdefault((t.layer, t.expert), []):
                    owners[(t.layer, t.expert)].append(i)
        return {k: tuple(v) for k, v in owners.items()}

    # -- store health ----------------------------------------------------------------------

    def _probe(self, store: int) -> bool:
        """One Health call with a short deadline (waiting for a connection within it)."""
        import grpc
        from protos import expert_service_pb2 as pb2

        try:
            reply = self.stubs[store].Health(pb2.HealthRequest(), metadata=self._metadata(),
                                             timeout=self.cfg.probe_timeout_s, wait_for_ready=True)
            return reply.serving
        except grpc.RpcError:
            return False

    def _choose(self, layer: int, expert: int, failed: set[int]) -> int | None:
        """The first holder of the expert that did not fail in this call and whose breaker allows it."""
        for store in self.owners[(layer, expert)]:
            if store not in failed and self.breakers[store].allows(lambda: self._probe(store)):
                return store
        return None

    def _request_bytes(self, store: int, layer: int, experts: list[int]) -> int:
        keys = [(layer, e, name) for e in experts for name in EXPERT_TENSORS]
        if any(k not in self.info for k in keys):
            self.manifest(store)  # once per source (a store without these raises NOT_FOUND on Fetch)
        return sum(self.info[k].nbytes for k in keys if k in self.info)

    # -- fetching --------------------------------------------------------------------------

    def fetch(self, layer: int, experts: list[int]) -> dict[int, Future]:
        futures = {e: Future() for e in experts}
        by_store: dict[int, list[int]] = {}
        for e in experts:
            owners = self.owners.get((layer, e))
            if not owners:
                futures[e].set_exception(KeyError(f"no store holds expert {e} of layer {layer}"))
                continue
            by_store.setdefault(owners[0], []).append(e)
        for store, group in by_store.items():
            self.pool.submit(self._fetch_group, layer, group, {e: futures[e] for e in group})
        return futures

    __call__ = fetch

    def _fetch_group(self, layer: int, experts: list[int], futures: dict[int, Future]) -> None:
        """Stream the experts from the first store that can serve them, each store a stream; a
        store that fails is skipped (and its breaker opened) and its experts asked of a replica."""
        import grpc

        failed: set[int] = set()  # stores that failed during this call
        pending = list(experts)
        try:
            while pending:
                groups: dict[int, list[int]] = {}
                for e in pending:
                    store = self._choose(layer, e, failed)
                    if store is None:
                        futures[e].set_exception(self._unavailable(layer, e, failed))
                    else:
                        groups.setdefault(store, []).append(e)
                for store, group in groups.items():
                    try:
                        self._stream(store, layer, group, futures)
                        self.breakers[store].succeeded()
                    except grpc.RpcError as err:
                        code = err.code()
                        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                            raise
                        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy is not broken
                            self.breakers[store].failed()
                        failed.add(store)
                        self.metrics.failovers += 1
                pending = [e for e in pending if not futures[e].done()]
        except Exception as err:  # corrupt bytes, a refused request, a malformed reply: never hang the caller
            for e in experts:
                if not futures[e].done():
                    futures[e].set_exception(err)

    def _unavailable(self, layer: int, expert: int, failed: set[int]) -> ExpertUnavailableError:
        owners = self.owners[(layer, expert)]
        skipped = [self.addresses[s] for s in owners if s not in failed]
        return ExpertUnavailableError(
            f"experts [{expert}] of layer {layer}: no store answered (failed now: {[self.addresses[s] for s in sorted(failed)]}; "
            f"skipped, failed within the last {self.cfg.retry_after_s:g} s: {skipped})"
        )

    def _stream(self, store: int, layer: int, experts: list[int], futures: dict[int, Future]) -> None:
        from protos import expert_service_pb2 as pb2

        timeout = self.cfg.deadline(self._request_bytes(store, layer, experts))
        started = time.perf_counter()
        request = pb2.FetchRequest(layer=layer, experts=experts, chunk_bytes=self.cfg.chunk_bytes)
        buffers: dict[tuple[int, str], bytearray] = {}
        infos: dict[tuple[int, str], object] = {}
        parts: dict[int, dict[str, torch.Tensor]] = {}
        first = True
        for message in self.fetch_calls[store](request, metadata=self._metadata(), timeout=timeout):
            chunk = decode_chunk(message)
            key = (chunk.expert, chunk.name)
            if chunk.info is not None:
                infos[key] = chunk.info
                buffers[key] = bytearray(chunk.info.nbytes)
            if key not in buffers or chunk.offset + len(chunk.data) > len(buffers[key]):
                raise ExpertUnavailableError(f"store {self.addresses[store]} sent a malformed chunk of {key}")
            buf = buffers[key]
            buf[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data  # the one copy of the payload
            if chunk.offset + len(chunk.data) == len(buf):
                info = infos[key]
                if self.verify:
                    check_crc(buf, info.crc32, f"layer {layer} expert {chunk.expert} tensor {chunk.name!r}")
                parts.setdefault(chunk.expert, {})[chunk.name] = tensor_from_bytes(buf, info.dtype, list(info.shape))
                if len(parts[chunk.expert]) == len(EXPERT_TENSORS):
                    pair = tuple(parts[chunk.expert][n] for n in EXPERT_TENSORS)
                    # counted before the caller can see it: one call per stream, latency per expert
                    self.metrics.record(sum(t.nbytes for t in pair), 1, time.perf_counter() - started, calls=int(first))
                    first = False
                    futures[chunk.expert].set_result(pair)
        missing = [e for e in experts if not futures[e].done()]
        if missing:
            raise ExpertUnavailableError(f"store {self.addresses[store]} ended the stream without experts {missing}")

    def compute(self, layer: int, expert: int, x: torch.Tensor) -> Future:
        """Run one expert's FFN on its store: x [n, H] -> future of [n, H] (same dtype)."""
        import grpc
        from protos import expert_service_pb2 as pb2

        dtype = next(name for name, d in DTYPES.items() if d == x.dtype)
        request = pb2.ComputeRequest(layer=layer, expert=expert, dtype=dtype, shape=list(x.shape),
                                     activations=x.contiguous().view(torch.uint8).numpy().tobytes())
        timeout = self.cfg.deadline(2 * x.nbytes)  # activations there and back

        def call():
            failed: set[int] = set()
            while (store := self._choose(layer, expert, failed)) is not None:
                try:
                    reply = self.stubs[store].Compute(request, metadata=self._metadata(), timeout=timeout)
                except grpc.RpcError as err:
                    if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    self.breakers[store].failed()
                    failed.add(store)
                    self.metrics.failovers += 1
                    continue
                self.breakers[store].succeeded()
                return tensor_from_bytes(bytearray(reply.output), reply.dtype, list(reply.shape))
            raise self._unavailable(layer, expert, failed)

        return self.pool.submit(call)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for channel in self.channels:
            channel.close()
