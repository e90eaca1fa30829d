"""The store side of ``ExpertService`` (``protos/expert_service.proto``), usable without Ray.

``ExpertTable`` holds a store's experts in memory; ``serve_experts`` runs the gRPC server
over it with explicit limits, optional bearer-token auth and optional TLS. The ``ExpertStore``
actor wraps the same table and server.

The server is asynchronous (``grpc.aio`` on an event loop of its own thread): a Fetch stream
whose client stops reading waits in HTTP/2 flow control as a suspended coroutine, not as a
blocked worker thread, so stalled or slow readers cannot take the store from other clients
(a thread pool of N workers is taken by N stalled streams). Streams are also bounded: at
most ``max_fetch_streams`` are served at once (more are refused with RESOURCE_EXHAUSTED),
and the store stops serving a stream whose client took nothing for ``stall_timeout_s``,
freeing its slot; gRPC keeps the one message that could not be sent until the client goes
away or its own deadline passes. ``Compute`` runs on ``workers`` threads.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import threading
from collections.abc import Iterator
from concurrent import futures as cf
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from protos import expert_service_pb2 as pb2
from specmoe.expert_source import DTYPES, tensor_from_bytes
from specmoe.layers import activation, expert_ffn
from specmoe.shards import EXPERT_TENSORS, ShardReader
from specmoe.tensor_wire import encode_chunks

Key = tuple[int, int]
SERVICE = pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name  # "specmoe.ExpertService"
MIN_CHUNK_BYTES = 64 << 10  # smaller chunks cost a message per few KiB (a client could ask for 1 byte)
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (a host name other than localhost is not)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """How a store serves ``ExpertService``: where, with which credentials, within which limits.

    A store bound to an address other than loopback must have both a bearer token and TLS
    (anyone who reaches it could otherwise read the model's weights, or sniff the token);
    ``insecure_ok=True`` serves without them anyway, with a warning in the store's log.
    """

    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 64 << 20
    max_request_bytes: int = 4 << 30  # bytes one Fetch may ask for (a layer of Mixtral-8x7B is ~2.8 GB)
    max_fetch_streams: int = 64  # Fetch streams served at once; more are refused (RESOURCE_EXHAUSTED)
    stall_timeout_s: float = 30.0  # a Fetch stream whose client takes nothing for this long is ended
    max_compute_tokens: int = 4096
    workers: int = 8  # threads that run Compute
    # Keep every tensor's Fetch messages serialized (in chunks of chunk_bytes), so a Fetch
    # copies nothing: a second copy of the experts. False: serialize per request.
    encode_once: bool = True
    insecure_ok: bool = False  # serve a non-loopback address without token or TLS

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files), or neither")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= self.max_message_bytes // 2:
            raise ValueError(f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {self.max_message_bytes // 2}], got {self.chunk_bytes}")
        for name in ("max_request_bytes", "max_fetch_streams", "max_compute_tokens", "workers"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0 seconds, got {self.stall_timeout_s}")
        missing = self.unprotected()
        if missing and not self.insecure_ok:
            raise ValueError(
                f"refusing to serve experts on {self.host} (not a loopback address) without {' or '.join(missing)}: "
                "anyone who reaches it could read the model's weights. Give both, bind 127.0.0.1, "
                "or set insecure_ok=True on a network you trust"
            )

    def unprotected(self) -> list[str]:
        """What this server lacks to be reachable from other machines safely ([] on loopback)."""
        if is_loopback(self.host):
            return []
        return [what for what, given in (("a token", self.token), ("TLS (tls_cert, tls_key)", self.tls_cert)) if not given]


class ExpertTable:
    """The experts one store holds, in memory, with their manifest entries."""

    def __init__(self, shard_dir: str | Path, keys: list[Key] | None = None, verify: bool = True):
        reader = ShardReader(shard_dir)
        self.model = reader.model
        self.keys = sorted(keys if keys is not None else reader.keys())
        self.entries = {key: {e["name"]: e for e in reader.entries(*key) if e["name"] in EXPERT_TENSORS} for key in self.keys}
        self.tensors: dict[Key, dict[str, torch.Tensor]] = {key: reader.read_tensors(*key, verify=verify) for key in self.keys}
        self.act_fn = activation(reader.config().get("hidden_act", "silu"))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for pair in self.tensors.values() for t in pair.values())

    def expert_bytes(self, key: Key) -> int:
        return sum(e["nbytes"] for e in self.entries[key].values())

    def data(self, key: Key, name: str) -> memoryview:
        return memoryview(self.tensors[key][name].contiguous().view(torch.uint8).numpy()).cast("B")

    def infos(self, key: Key) -> list[pb2.TensorInfo]:
        return [
            pb2.TensorInfo(layer=key[0], expert=key[1], name=e["name"], dtype=e["dtype"], shape=e["shape"],
                           nbytes=e["nbytes"], crc32=e["crc32"])
            for e in self.entries[key].values()
        ]


class ExpertServicer:
    """The four RPCs, as coroutines of the server's event loop (one loop: no locks needed)."""

    def __init__(self, table: ExpertTable, cfg: ServerConfig):
        self.table, self.cfg = table, cfg
        self.encoded: dict[Key, list[bytes]] = {}
        if cfg.encode_once:
            self.encoded = {key: list(self.encode(key, cfg.chunk_bytes)) for key in table.keys}
        self.streams = 0  # Fetch streams being served
        self.pool = cf.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="expert-compute")

    def encode(self, key: Key, chunk_bytes: int) -> Iterator[bytes]:
        for info in self.table.infos(key):
            yield from encode_chunks(info, self.table.data(key, info.name), chunk_bytes)

    async def Manifest(self, request, context):
        return pb2.ManifestReply(model=self.table.model, tensors=[i for key in self.table.keys for i in self.table.infos(key)])

    def fetch_error(self, request) -> tuple[grpc.StatusCode, str] | None:
        chunk = request.chunk_bytes or self.cfg.chunk_bytes
        if not MIN_CHUNK_BYTES <= chunk <= self.cfg.max_message_bytes // 2:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"chunk_bytes {chunk} is outside [{MIN_CHUNK_BYTES}, {self.cfg.max_message_bytes // 2}] (0: the server's default)")
        experts = list(dict.fromkeys(request.experts))
        missing = [e for e in experts if (request.layer, e) not in self.table.tensors]
        if missing:
            return grpc.StatusCode.NOT_FOUND, f"this store has no experts {missing} of layer {request.layer}"
        nbytes = sum(self.table.expert_bytes((request.layer, e)) for e in experts)
        if nbytes > self.cfg.max_request_bytes:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"the request asks for {nbytes} bytes, over this store's limit of {self.cfg.max_request_bytes} "
                "per Fetch (max_request_bytes): ask for fewer experts at a time")
        if self.streams >= self.cfg.max_fetch_streams:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"this store serves at most {self.cfg.max_fetch_streams} Fetch streams at once; try again or another replica")
        return None

    async def Fetch(self, request, context):
        error = self.fetch_error(request)
        if error is not None:
            await context.abort(*error)
        chunk = request.chunk_bytes or self.cfg.chunk_bytes
        self.streams += 1
        try:
            for e in dict.fromkeys(request.experts):  # serialized TensorChunk messages (see specmoe.tensor_wire)
                key = (request.layer, e)
                messages = self.encoded[key] if chunk == self.cfg.chunk_bytes and key in self.encoded else self.encode(key, chunk)
                for message in messages:
                    try:  # waits while HTTP/2 flow control holds the message back: the client is not reading
                        await asyncio.wait_for(context.write(message), self.cfg.stall_timeout_s)
                    except asyncio.TimeoutError:  # stop serving it (the status reaches a client that reads again)
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"the client took nothing for {self.cfg.stall_timeout_s:g} s (stall_timeout_s)")
        finally:
            self.streams -= 1

    def compute_error(self, request) -> tuple[grpc.StatusCode, str] | None:
        key = (request.layer, request.expert)
        if key not in self.table.tensors:
            return grpc.StatusCode.NOT_FOUND, f"this store has no expert {request.expert} of layer {request.layer}"
        if request.dtype not in DTYPES:
            return grpc.StatusCode.INVALID_ARGUMENT, f"dtype {request.dtype!r} not in {sorted(DTYPES)}"
        hidden = self.table.tensors[key]["down"].shape[0]
        if len(request.shape) != 2 or request.shape[1] != hidden or request.shape[0] < 1:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"activations must have shape [n, {hidden}] with n >= 1 tokens, got {list(request.shape)}")
        if request.shape[0] > self.cfg.max_compute_tokens:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"{request.shape[0]} tokens exceed the store's limit of {self.cfg.max_compute_tokens} per Compute call")
        if len(request.activations) != request.shape[0] * hidden * DTYPES[request.dtype].itemsize:
            return grpc.StatusCode.INVALID_ARGUMENT, "activations byte length does not match shape and dtype"
        return None

    async def Compute(self, request, context):
        error = self.compute_error(request)
        if error is not None:
            await context.abort(*error)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.compute, request)

    def compute(self, request) -> pb2.ComputeReply:
        dtype = DTYPES[request.dtype]
        x = tensor_from_bytes(bytearray(request.activations), request.dtype, list(request.shape))  # [n, H]
        weights = self.table.tensors[(request.layer, request.expert)]
        with torch.inference_mode():
            y = expert_ffn(x, weights["gate_up"].to(dtype), weights["down"].to(dtype), self.table.act_fn)  # [n, H]
        return pb2.ComputeReply(dtype=request.dtype, shape=list(y.shape), output=y.contiguous().view(torch.uint8).numpy().tobytes())

    async def Health(self, request, context):
        return pb2.HealthReply(serving=True, experts=len(self.table.keys), bytes=self.table.nbytes, model=self.table.model)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call whose ``authorization`` metadata is not ``Bearer <token>`` (compared in
    constant time)."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self.expected):
            return await continuation(handler_call_details)
        return self.deny_stream if handler_call_details.method.endswith("/Fetch") else self.deny


def expert_service_handler(servicer: ExpertServicer) -> grpc.GenericRpcHandler:
    """The generated registration, except that Fetch yields messages it serialized itself."""

    def unary(method, request, reply):
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request.FromString, response_serializer=reply.SerializeToString
        )

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Manifest": unary(servicer.Manifest, pb2.ManifestRequest, pb2.ManifestReply),
        "Fetch": grpc.unary_stream_rpc_method_handler(servicer.Fetch, request_deserializer=pb2.FetchRequest.FromString),
        "Compute": unary(servicer.Compute, pb2.ComputeRequest, pb2.ComputeReply),
        "Health": unary(servicer.Health, pb2.HealthRequest, pb2.HealthReply),
    })


class ExpertServer:
    """A running ``ExpertService``: a ``grpc.aio`` server on an event loop in a thread of its own,
    so that it serves from any process (a test, a Ray actor) without taking its main thread."""

    def __init__(self, table: ExpertTable, cfg: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="expert-service", daemon=True)
        self.thread.start()
        self.servicer = ExpertServicer(table, cfg)
        try:
            self.server, self.port = self._run(self._start(cfg))
        except BaseException:
            self._close_loop()
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _start(self, cfg: ServerConfig):
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
        ]
        interceptors = [BearerTokenInterceptor(cfg.token)] if cfg.token else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        server.add_generic_rpc_handlers((expert_service_handler(self.servicer),))
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        await server.start()
        return server, port

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds; None: cancelled at once)."""
        if self.loop.is_closed():
            return
        self._run(self.server.stop(grace))
        self._close_loop()
        self.servicer.pool.shutdown(wait=False, cancel_futures=True)

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def serve_experts(table: ExpertTable, cfg: ServerConfig) -> tuple[ExpertServer, int]:
    """Start the server; returns it and the bound port."""
    missing = cfg.unprotected()
    if missing:  # only with insecure_ok=True (ServerConfig refuses otherwise)
        log.warning("serving experts on %s without %s (insecure_ok=True): anyone who reaches this address "
                    "can read the model's weights", cfg.host, " or ".join(missing))
    server = ExpertServer(table, cfg)
    return server, server.port
