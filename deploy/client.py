"""The client API: ``connect()`` to a deployment and generate through its coordinator.

    client = connect()                       # a local multi-node cluster with the default deployment
    client = connect("127.0.0.1:6380")       # a running cluster (or "auto"); same API
    [c.text for c in client.generate(["ROMEO:", "JULIET:"], GenerationParams(max_new_tokens=32))]
    for piece in client.stream("ROMEO:", GenerationParams(stop=["\\n\\n"])):
        print(piece.text, end="")

Every call goes to the ``Coordinator`` actor. Streams are long polls keyed by a cursor (tokens
and characters already received): when the coordinator restarts, the client asks again with
the same cursor and the stream goes on with no duplicated and no missing piece. A stream
closed early, or a client that stops polling, frees its request's slot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from actors.coordinator import GenerationParams, Overloaded, UnknownRequest
from specmoe.sampling import SamplingParams

__all__ = ["Client", "Completion", "GenerationParams", "Overloaded", "Piece", "connect"]


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: dict = field(default_factory=dict)


@dataclass
class Piece:
    """What a stream yields: the committed tokens and text gained since the last piece."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    metrics: dict | None = None  # on the last piece


class RequestFailed(RuntimeError):
    """A request a decoder could not serve (its error says why)."""


Params = GenerationParams | SamplingParams | dict | None


class Client:
    """Generate through a coordinator actor. ``connect()`` makes one; ``close()`` stops what it started."""

    def __init__(self, coordinator, spec=None, deployment=None, cluster=None, owns_ray: bool = False,
                 reconnect_s: float = 120.0, poll_s: float = 1.0):
        self.coordinator = coordinator
        self.spec = spec  # names the coordinator, to find it again after a restart
        self.deployment = deployment
        self.cluster = cluster
        self.owns_ray = owns_ray
        self.reconnect_s = reconnect_s
        self.poll_s = poll_s

    # -- the API ----------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], params: Params = None, request_id: str | None = None) -> str:
        """Admit one request; returns its id. Raises ``Overloaded`` when the queue is full."""
        request_id = request_id or uuid.uuid4().hex
        return self._call("submit", request_id, prompt, GenerationParams.of(params))

    def generate(self, prompts: list[str | list[int]], params: Params | list[Params] = None) -> list[Completion]:
        """Run ``prompts`` concurrently to completion; results in their order. ``params``: one
        for all, or one per prompt. If the queue fills up midway, the requests already admitted
        are aborted and ``Overloaded`` is raised."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"got {len(each)} params for {len(prompts)} prompts; give one, or one per prompt")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, each):
                ids.append(self.submit(prompt, p))
            return self.wait(ids)
        except BaseException:
            for rid in ids:
                self._abort_quietly(rid)
            raise

    def wait(self, request_ids: list[str]) -> list[Completion]:
        """Wait for submitted requests to finish; their completions, in the order given."""
        done = self._wait(list(request_ids))
        return [done[rid] for rid in request_ids]

    def stream(self, prompt: str | list[int], params: Params = None, request_id: str | None = None) -> Iterator[Piece]:
        """Pieces of committed tokens and text, in order, each exactly once; the last has
        ``finished`` set. Closing the iterator early aborts the request."""
        rid = self.submit(prompt, params, request_id)
        return self._follow(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its slot (ignored when it already finished)."""
        self._call("abort", request_id)

    def metrics(self) -> dict:
        """The coordinator's counters: queued, running, finished, readmitted, per-decoder state."""
        return self._call("metrics")

    def decoder_metrics(self) -> list[dict | None]:
        """Each decoder's engine metrics (tokens/s, bytes moved, cache hits, transport)."""
        return self._call("decoder_metrics")

    def close(self) -> None:
        """Stop the cluster this client started (nothing, when it joined a running one)."""
        if self.cluster is not None:
            self.cluster.__exit__(None, None, None)
            self.cluster = None
        elif self.owns_ray:
            import ray

            ray.shutdown()
        self.owns_ray = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- streams ----------------------------------------------------------------------------

    def _follow(self, rid: str) -> Iterator[Piece]:
        seen = chars = 0
        finished = False
        try:
            while not finished:
                chunk = self._call("poll", {rid: (seen, chars)}, self.poll_s)[rid]
                seen, chars = seen + len(chunk.token_ids), chars + len(chunk.text)
                finished = chunk.finished
                _raise_if_failed(chunk)
                if chunk.token_ids or chunk.text or finished:
                    yield Piece(rid, chunk.text, chunk.token_ids, finished, chunk.finish_reason, chunk.metrics)
        finally:
            if not finished:
                self._abort_quietly(rid)

    def _wait(self, ids: list[str]) -> dict[str, Completion]:
        cursors = {rid: (0, 0) for rid in ids}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        done: dict[str, Completion] = {}
        while cursors:
            for rid, chunk in self._call("poll", cursors, self.poll_s).items():
                tokens[rid] += chunk.token_ids
                texts[rid].append(chunk.text)
                seen, chars = cursors[rid]
                cursors[rid] = (seen + len(chunk.token_ids), chars + len(chunk.text))
                if chunk.finished:
                    _raise_if_failed(chunk)
                    del cursors[rid]
                    done[rid] = Completion(rid, "".join(texts[rid]), tokens[rid], chunk.finish_reason, chunk.metrics or {})
        return done

    # -- calls ------------------------------------------------------------------------------

    def _call(self, method: str, *args):
        """One coordinator call; while the coordinator is restarting (or briefly unreachable),
        the same call again, for up to ``reconnect_s``. Errors of the call itself (``Overloaded``,
        ``ValueError``, ``UnknownRequest``) arrive as themselves, not wrapped."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                return ray.get(getattr(self.coordinator, method).remote(*args))
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                self._refresh_handle()
            except RayTaskError as err:
                if isinstance(err.cause, (Overloaded, ValueError, UnknownRequest)):
                    raise err.cause from None
                raise

    def _refresh_handle(self) -> None:
        if self.spec is None:
            return
        import ray

        spec = self.spec
        try:
            self.coordinator = ray.get_actor(spec.coordinator_name, namespace=spec.namespace)
        except ValueError:
            pass  # not registered again yet

    def _abort_quietly(self, rid: str) -> None:
        try:
            self.abort(rid)
        except Exception:  # noqa: BLE001 - best effort: the coordinator also reaps abandoned requests
            pass


def _raise_if_failed(chunk) -> None:
    if chunk.finish_reason == "error":
        raise RequestFailed(f"request {chunk.request_id} failed: {chunk.error}")


def connect(address: str | None = None, spec=None) -> Client:
    """A client of the deployment ``spec`` (default: ``DeploymentSpec()``, the shipped model in
    specmoe mode, one store and one decoder).

    ``address=None``: join this process's Ray cluster if it has one, else start a local
    multi-node cluster (``cluster.local.LocalCluster``) with the store and decoder nodes the
    spec needs; ``client.close()`` stops it. An address (``"127.0.0.1:6380"`` or ``"auto"``):
    join that cluster. Either way the spec's coordinator is attached to by name, and the
    deployment built first when it is not there.
    """
    from cluster.local import ray_env

    ray_env()
    import ray

    from cluster.deployment import DeploymentSpec, build_deployment

    spec = spec if spec is not None else DeploymentSpec()
    if not isinstance(spec, DeploymentSpec):
        raise ValueError(f"spec must be a DeploymentSpec, got {type(spec).__name__}")
    if spec.decoders.count < 1:
        raise ValueError("a client needs decoders: decoders.count must be >= 1 (0 brings up stores only)")
    cluster, owns_ray = None, False
    if address is None and not ray.is_initialized():
        from cluster.local import ClusterSpec, LocalCluster

        cluster = LocalCluster(ClusterSpec(stores=spec.stores.count, decoders=spec.decoders.count)).__enter__()
    elif address is not None and not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        owns_ray = True
    try:
        coordinator = _named(spec.coordinator_name, spec.namespace)
        deployment = None
        if coordinator is None:
            deployment = build_deployment(spec)
            coordinator = deployment.coordinator
        client = Client(coordinator, spec, deployment, cluster, owns_ray)
        client._call("health")
        return client
    except BaseException:
        if cluster is not None:
            cluster.__exit__(None, None, None)
        elif owns_ray:
            ray.shutdown()
        raise


def _named(name: str, namespace: str):
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
