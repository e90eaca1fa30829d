"""The gRPC transport: ``GrpcSource`` streams experts from ``ExpertService`` servers.

Same interface as every source (``specmoe.expert_source``): ``fetch(layer, experts)``
returns one future per expert, all requested together.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from specmoe.expert_source import DTYPES, ExpertUnavailableError, TransportMetrics, check_crc, tensor_from_bytes
from specmoe.shards import EXPERT_TENSORS
from specmoe.tensor_wire import decode_chunk

FETCH_METHOD = "/specmoe.ExpertService/Fetch"


def _serialize(message) -> bytes:
    return message.SerializeToString()


@dataclass
class GrpcConfig:
    """How a client reaches stores: bearer token, TLS root certificate, chunk size, limits."""

    token: str | None = None
    root_cert: bytes | None = None  # PEM; None = plaintext
    server_name: str | None = None  # TLS name override (e.g. "localhost" for a test certificate)
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 64 << 20
    timeout_s: float = 30.0
    workers: int = 4


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


class GrpcSource:
    """Experts streamed from one or more ``ExpertService`` servers.

    ``owners`` maps (layer, expert) to the indices of the addresses that hold it, primary
    first (from placement, or learned from each server's Manifest when not given). A call
    that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried on the next replica.
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
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.workers, thread_name_prefix="grpc-fetch")
        self.info: dict[tuple[int, int, str], object] = {}
        self.owners = owners if owners is not None else self._learn_owners()

    def _metadata(self):
        return (("authorization", f"Bearer {self.cfg.token}"),) if self.cfg.token else ()

    def manifest(self, index: int):
        from protos import expert_service_pb2 as pb2

        return self.stubs[index].Manifest(pb2.ManifestRequest(), metadata=self._metadata(), timeout=self.cfg.timeout_s)

    def _learn_owners(self) -> dict[tuple[int, int], tuple[int, ...]]:
        owners: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self.stubs)):
            for t in self.manifest(i).tensors:
                self.info[(t.layer, t.expert, t.name)] = t
                if i not in owners.setdefault((t.layer, t.expert), []):
                    owners[(t.layer, t.expert)].append(i)
        return {k: tuple(v) for k, v in owners.items()}

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
        import grpc

        tried: set[int] = set()
        pending = list(experts)
        while pending:
            candidates = [s for s in self.owners[(layer, pending[0])] if s not in tried]
            if not candidates:
                err = ExpertUnavailableError(
                    f"experts {pending} of layer {layer}: no store answered (tried {[self.addresses[s] for s in sorted(tried)]})"
                )
                for e in pending:
                    futures[e].set_exception(err)
                return
            store = candidates[0]
            try:
                self._stream(store, layer, pending, futures)
                return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    for e in pending:
                        if not futures[e].done():
                            futures[e].set_exception(err)
                    return
                tried.add(store)
                self.metrics.failovers += 1
                pending = [e for e in pending if not futures[e].done()]
            except Exception as err:  # corrupt bytes or a malformed reply: never hang the caller
                for e in pending:
                    if not futures[e].done():
                        futures[e].set_exception(err)
                return

    def _stream(self, store: int, layer: int, experts: list[int], futures: dict[int, Future]) -> None:
        from protos import expert_service_pb2 as pb2

        started = time.perf_counter()
        request = pb2.FetchRequest(layer=layer, experts=experts, chunk_bytes=self.cfg.chunk_bytes)
        buffers: dict[tuple[int, str], bytearray] = {}
        infos: dict[tuple[int, str], object] = {}
        parts: dict[int, dict[str, torch.Tensor]] = {}
        first = True
        for message in self.fetch_calls[store](request, metadata=self._metadata(), timeout=self.cfg.timeout_s):
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
        from protos import expert_service_pb2 as pb2

        dtype = next(name for name, d in DTYPES.items() if d == x.dtype)
        request = pb2.ComputeRequest(layer=layer, expert=expert, dtype=dtype, shape=list(x.shape),
                                     activations=x.contiguous().view(torch.uint8).numpy().tobytes())
        store = self.owners[(layer, expert)][0]

        def call():
            reply = self.stubs[store].Compute(request, metadata=self._metadata(), timeout=self.cfg.timeout_s)
            return tensor_from_bytes(bytearray(reply.output), reply.dtype, list(reply.shape))

        return self.pool.submit(call)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for channel in self.channels:
            channel.close()
