"""The ``Decoder`` actor: an ``Engine`` in a process on a decoder node.

Its experts come from ``ExpertStore`` actors through the Ray object store (or over gRPC);
the engine itself knows nothing of Ray.
"""

from __future__ import annotations

import ray

from specmoe.config import EngineConfig
from specmoe.engine import Engine
from specmoe.metrics import summarize
from specmoe.sampling import SamplingParams

DECODER_RESOURCE = "decoder"


class Decoder:
    def __init__(self, config: EngineConfig, stores: list | None = None, owners: dict | None = None,
                 grpc_addresses: list[str] | None = None, verify: bool = True):
        self.source = None
        if config.decoder.mode != "resident":
            if grpc_addresses:
                from actors.grpc_source import GrpcSource

                self.source = GrpcSource(grpc_addresses, verify=verify, owners=owners)
            else:
                from actors.ray_source import RaySource

                self.source = RaySource(stores, owners, verify=verify)
        self.engine = Engine(config, fetch=self.source)

    def generate(self, prompts: list, params: SamplingParams) -> list[list[int]]:
        return [c.token_ids for c in self.engine.generate(prompts, params)]

    def metrics(self, generated_tokens: int = 0, wall_s: float = 0.0) -> dict:
        out = summarize(self.engine, generated_tokens, wall_s)
        if self.source is not None:
            out["transport"] = self.source.metrics.snapshot()
        return out

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def decoder_actor(**options):
    """``Decoder`` as a Ray actor on a node with the ``decoder`` resource (``num_cpus=0``)."""
    return ray.remote(num_cpus=0, resources={DECODER_RESOURCE: 1}, **options)(Decoder)
