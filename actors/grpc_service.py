"""The store side of ``ExpertService`` (``protos/expert_service.proto``), usable without Ray.

``ExpertTable`` holds a store's experts in memory; ``serve_experts`` runs the gRPC server
over it with explicit message-size limits, optional bearer-token auth and optional TLS.
The ``ExpertStore`` actor wraps the same table and server.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures as cf
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from protos import expert_service_pb2 as pb2
from protos import expert_service_pb2_grpc as pb2_grpc
from specmoe.expert_source import DTYPES, tensor_from_bytes
from specmoe.layers import activation, expert_ffn
from specmoe.shards import EXPERT_TENSORS, ShardReader
from specmoe.tensor_wire import encode_chunks

Key = tuple[int, int]
SERVICE = pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name  # "specmoe.ExpertService"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    token: str | None = None
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    chunk_bytes: int = 1 << 20
    max_message_bytes: int = 64 << 20
    max_compute_tokens: int = 4096
    workers: int = 8
    # Keep every tensor's Fetch messages serialized (in chunks of chunk_bytes), so a Fetch
    # copies nothing: a second copy of the experts. False: serialize per request.
    encode_once: bool = True

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files), or neither")
        if not 0 < self.chunk_bytes <= self.max_message_bytes // 2:
            raise ValueError(f"chunk_bytes must be in (0, {self.max_message_bytes // 2}], got {self.chunk_bytes}")


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

    def data(self, key: Key, name: str) -> memoryview:
        return memoryview(self.tensors[key][name].contiguous().view(torch.uint8).numpy()).cast("B")

    def infos(self, key: Key) -> list[pb2.TensorInfo]:
        return [
            pb2.TensorInfo(layer=key[0], expert=key[1], name=e["name"], dtype=e["dtype"], shape=e["shape"],
                           nbytes=e["nbytes"], crc32=e["crc32"])
            for e in self.entries[key].values()
        ]


class ExpertServicer(pb2_grpc.ExpertServiceServicer):
    def __init__(self, table: ExpertTable, cfg: ServerConfig):
        self.table, self.cfg = table, cfg
        self.encoded: dict[Key, list[bytes]] = {}
        if cfg.encode_once:
            self.encoded = {key: list(self.encode(key, cfg.chunk_bytes)) for key in table.keys}

    def encode(self, key: Key, chunk_bytes: int) -> Iterator[bytes]:
        for info in self.table.infos(key):
            yield from encode_chunks(info, self.table.data(key, info.name), chunk_bytes)

    def Manifest(self, request, context):
        return pb2.ManifestReply(model=self.table.model, tensors=[i for key in self.table.keys for i in self.table.infos(key)])

    def Fetch(self, request, context):
        chunk = request.chunk_bytes or self.cfg.chunk_bytes
        if chunk > self.cfg.max_message_bytes // 2:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_bytes {chunk} exceeds {self.cfg.max_message_bytes // 2}")
        missing = [e for e in request.experts if (request.layer, e) not in self.table.tensors]
        if missing:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this store has no experts {missing} of layer {request.layer}")
        for e in request.experts:  # serialized TensorChunk messages (see specmoe.tensor_wire)
            key = (request.layer, e)
            if chunk == self.cfg.chunk_bytes and key in self.encoded:
                yield from self.encoded[key]
            else:
                yield from self.encode(key, chunk)

    def Compute(self, request, context):
        key = (request.layer, request.expert)
        if key not in self.table.tensors:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this store has no expert {request.expert} of layer {request.layer}")
        if request.dtype not in DTYPES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"dtype {request.dtype!r} not in {sorted(DTYPES)}")
        hidden = self.table.tensors[key]["down"].shape[0]
        if len(request.shape) != 2 or request.shape[1] != hidden:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"activations must have shape [n, {hidden}], got {list(request.shape)}")
        if request.shape[0] > self.cfg.max_compute_tokens:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.shape[0]} tokens exceed the store's limit of {self.cfg.max_compute_tokens} per Compute call",
            )
        dtype = DTYPES[request.dtype]
        if len(request.activations) != request.shape[0] * hidden * dtype.itemsize:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "activations byte length does not match shape and dtype")
        x = tensor_from_bytes(bytearray(request.activations), request.dtype, list(request.shape))
        weights = self.table.tensors[key]
        with torch.inference_mode():
            y = expert_ffn(x, weights["gate_up"].to(dtype), weights["down"].to(dtype), self.table.act_fn)
        return pb2.ComputeReply(dtype=request.dtype, shape=list(y.shape), output=y.contiguous().view(torch.uint8).numpy().tobytes())

    def Health(self, request, context):
        return pb2.HealthReply(serving=True, experts=len(self.table.keys), bytes=self.table.nbytes, model=self.table.model)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") == self.expected:
            return continuation(handler_call_details)
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


def serve_experts(table: ExpertTable, cfg: ServerConfig) -> tuple[grpc.Server, int]:
    """Start the server; returns it and the bound port."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
    ]
    interceptors = [BearerTokenInterceptor(cfg.token)] if cfg.token else []
    server = grpc.server(cf.ThreadPoolExecutor(max_workers=cfg.workers), options=options, interceptors=interceptors)
    server.add_generic_rpc_handlers((expert_service_handler(ExpertServicer(table, cfg)),))
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port
