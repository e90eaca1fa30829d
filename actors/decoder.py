"""The ``Decoder`` actor: an ``Engine`` in a process on a decoder node, driven round by round.

Its experts come from ``ExpertStore`` actors through the Ray object store (or over gRPC);
it builds its own source from a ``SourceSpec`` (store names, not references), so that it
can build it again after a store restarted. The engine itself knows nothing of Ray.

Failure contract (what a caller of ``step()`` can rely on):

* ``Engine.step()`` is atomic: when a round raises, every request is exactly as it was
  before the round (KV truncated back, drafts dropped, nothing committed).
* On an expert-store failure (``ExpertUnavailableError``, a Ray actor or object error, a gRPC
  error) the decoder refreshes its source, which picks up the references a restarted store
  published, and runs the round again itself, up to ``RetryPolicy.attempts`` times with a
  growing pause. If the round still fails it raises ``DecoderRoundError``; its requests are
  intact and a later ``step()`` may succeed.
* Any other error is one it cannot vouch for: the decoder marks itself dead
  (``health()["alive"]`` is False) and every later call raises ``DecoderDead``. Its requests
  must be re-admitted elsewhere from their prompts and committed tokens.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import ray

from actors.telemetry import DecoderTelemetry
from specmoe.config import EngineConfig
from specmoe.engine import Engine, StepOutput
from specmoe.expert_source import ExpertUnavailableError
from specmoe.metrics import summarize
from specmoe.sampling import SamplingParams

DECODER_RESOURCE = "decoder"
SOURCE_KINDS = ("ray", "grpc")


class DecoderRoundError(RuntimeError):
    """A round failed on expert stores even after refreshing; the decoder's requests are intact."""


class DecoderDead(RuntimeError):
    """The decoder hit an error it cannot recover from; re-admit its requests elsewhere."""


@dataclass(frozen=True)
class SourceSpec:
    """How to reach the expert stores; picklable, so a decoder can rebuild its source.

    kind "ray": ``stores`` are the names of ``ExpertStore`` actors in ``namespace``.
    kind "grpc": the stores' current gRPC addresses are asked of those actors, or, with no
    store names, ``addresses`` are used as given. ``grpc`` carries token and TLS.
    """

    kind: str
    stores: tuple[str, ...] = ()
    namespace: str | None = None
    owners: dict = field(default_factory=dict)  # (layer, expert) -> store indices, primary first
    addresses: tuple[str, ...] = ()
    grpc: object | None = None  # actors.grpc_source.GrpcConfig
    verify: bool = True
    link: object | None = None  # specmoe.link.LinkConfig: the source is built behind an emulated link

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}; allowed: {', '.join(SOURCE_KINDS)}")
        if not self.stores and not (self.kind == "grpc" and self.addresses):
            raise ValueError("a source needs store actor names (or, for grpc, addresses)")

    def build(self):
        """A new ``RaySource`` or ``GrpcSource`` over the stores as they are now (behind an
        ``EmulatedLink`` when ``link`` is set)."""
        source = self._transport()
        if self.link is None:
            return source
        from specmoe.link import EmulatedLink

        return EmulatedLink(source, self.link)

    def _transport(self):
        handles = [ray.get_actor(name, namespace=self.namespace) for name in self.stores]
        if self.kind == "ray":
            from actors.ray_source import RaySource

            return RaySource(handles, self.owners, verify=self.verify)
        from actors.grpc_source import GrpcSource

        addresses = list(self.addresses) or ray.get([h.grpc_address.remote() for h in handles])
        if None in addresses:
            raise ValueError(f"stores {list(self.stores)} serve no gRPC (started for the ray transport)")
        return GrpcSource(addresses, self.grpc, verify=self.verify, owners=self.owners or None)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a round is run again after a store failure, and the pauses between tries."""

    attempts: int = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0

    def __post_init__(self):
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(f"need attempts >= 1 and 0 <= backoff_s <= max_backoff_s, got {self}")

    def pause(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt)


def store_failures() -> tuple[type[BaseException], ...]:
    """Errors that mean a store (not this decoder) failed: refresh and retry."""
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, ObjectLostError, OwnerDiedError, RayActorError

    errors = [ExpertUnavailableError, RayActorError, ActorUnavailableError, ObjectLostError, OwnerDiedError, GetTimeoutError]
    try:
        import grpc

        errors.append(grpc.RpcError)
    except ImportError:
        pass
    return tuple(errors)


class _CurrentSource:
    """The engine's fetch function: forwards to whichever source the decoder holds now."""

    def __init__(self, source):
        self.source = source

    def __call__(self, layer: int, experts: list[int]):
        return self.source.fetch(layer, experts)

    @property
    def compute(self):
        self.source.compute  # noqa: B018 -- AttributeError when the source cannot compute (the engine asks)
        return lambda layer, expert, x: self.source.compute(layer, expert, x)


class Decoder:
    """One engine, driven by ``step()``. Plain class; ``decoder_actor()`` makes it a Ray actor."""

    def __init__(self, config: EngineConfig, source: SourceSpec | None = None, retry: RetryPolicy | None = None):
        if source is not None and not config.decoder.mode_spec.offloaded:
            raise ValueError("a resident decoder holds every expert; it takes no expert source")
        self.config, self.source_spec, self.retry = config, source, retry or RetryPolicy()
        self.source = source.build() if source is not None else None
        self._current = _CurrentSource(self.source) if self.source is not None else None
        self.engine = Engine(config, fetch=self._current)
        self.alive, self.cause = True, None
        self.generated_tokens, self.busy_s = 0, 0.0
        self.failed_rounds, self.refreshes, self.refresh_error = 0, 0, None
        self.telemetry = DecoderTelemetry()  # Prometheus metrics (a no-op outside Ray)

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; ValueError (and nothing queued) when it cannot be served."""
        self._check_alive()
        if any(s.request_id == request_id for s in [*self.engine.waiting, *self.engine.running]):
            raise ValueError(f"request id {request_id!r} is already being served by this decoder")
        self.engine.add_request(list(prompt_ids), params, request_id)

    def abort(self, request_id: str) -> None:
        """Drop a request (unknown ids are ignored)."""
        self._check_alive()
        self.engine.abort(request_id)

    def step(self) -> list[StepOutput]:
        """One round for every request this decoder holds; [] when idle. Committed tokens only."""
        self._check_alive()
        if not self.engine.has_unfinished():
            return []
        started = time.perf_counter()
        try:
            outputs = self._round()
        finally:
            self.busy_s += time.perf_counter() - started
        self.generated_tokens += sum(len(o.new_token_ids) for o in outputs)
        self.telemetry.round(self.engine)
        return outputs

    def _round(self) -> list[StepOutput]:
        failures = store_failures()
        for attempt in range(self.retry.attempts):
            try:
                return self.engine.step()
            except failures as err:
                self.failed_rounds += 1
                if attempt + 1 == self.retry.attempts:
                    raise DecoderRoundError(f"a round failed {self.retry.attempts} times on expert stores; "
                                            f"requests are intact: {err}") from err
                time.sleep(self.retry.pause(attempt))
                self._refresh()
            except Exception as err:
                self._die(err)
        raise AssertionError("unreachable")

    def _refresh(self) -> None:
        """New references from restarted stores: a Ray source forgets its cache; a gRPC source
        is built again, since a restarted store listens on a new port."""
        self.refreshes += 1
        if self.source is None:
            return
        if hasattr(self.source, "refresh"):
            self.source.refresh()
            return
        metrics = self.source.metrics
        try:
            fresh = self.source_spec.build()
        except Exception as err:  # the stores are not back yet: the next try builds again
            self.refresh_error = f"{type(err).__name__}: {err}"
            return
        self.refresh_error = None
        self.source.close()
        fresh.metrics = metrics
        self.source = self._current.source = fresh

    def _die(self, err: BaseException):
        self.alive, self.cause = False, f"{type(err).__name__}: {err}"
        raise DecoderDead(f"decoder failed and will not serve again ({self.cause})") from err

    def _check_alive(self) -> None:
        if not self.alive:
            raise DecoderDead(f"decoder failed and will not serve again ({self.cause})")

    # -- conveniences and reports -----------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts (token ids) to completion; the token ids of each, in order."""
        ids = [f"generate-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params)
        out = {rid: [] for rid in ids}
        done: set[str] = set()
        while len(done) < len(ids):
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id] += o.new_token_ids
                    done |= {o.request_id} if o.finished else set()
        return [out[rid] for rid in ids]

    def health(self) -> dict:
        return {
            "alive": self.alive,
            "cause": self.cause,
            "refresh_error": self.refresh_error,
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
            "mode": self.config.decoder.mode,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
            "pid": os.getpid(),
        }

    def metrics(self) -> dict:
        out = summarize(self.engine, self.generated_tokens, self.busy_s)
        out.update({"failed_rounds": self.failed_rounds, "refreshes": self.refreshes})
        if self.source is not None:
            out["transport"] = self.source.metrics.snapshot()
        return out

    def engine_config(self) -> EngineConfig:
        return self.config


def decoder_actor(**ray_options):
    """``Decoder`` as a Ray actor class. By default on a node with the ``decoder`` resource
    and ``num_cpus=0`` (a custom resource is what places it); ``ray_options`` override."""
    options = {"num_cpus": 0, "resources": {DECODER_RESOURCE: 1}} | ray_options
    return ray.remote(Decoder).options(**options)
