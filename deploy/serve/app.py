"""The OpenAI-compatible HTTP endpoint: a Ray Serve ingress (``SpecMoEIngress``) in front of
the coordinator of one SpecMoE deployment.

    serve run deploy/serve/config.yaml      # from the repository root (see that file)
    specmoe serve --port 8000               # a local multi-node cluster and this app, until Ctrl-C

``build_app(args)`` is the import path (``deploy.serve.app:build_app``); ``args`` is
``{"spec": <DeploymentSpec as a dict>}`` or ``{"spec_file": "<YAML or JSON path>"}``, plus
optional ``"api_key"`` (then every ``/v1`` route wants ``Authorization: Bearer <key>``),
``"model_name"`` (the served model id; default: the model directory's name) and
``"max_body_bytes"`` (default 4 MiB). Every replica starts the deployment's stores, decoders
and coordinator, or attaches to them by name when they run (``start_or_attach``): autoscaled
replicas share one coordinator, and replicas that start at the same moment race for the names
without starting a second set.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` and ``GET /v1/health`` (no key needed: 200 when the
coordinator answers and has a live decoder, else 503). Parameters and their limits are listed in
``deploy/serve/protocol.py``. ``"stream": true`` answers with server-sent events in OpenAI's
chunk format, ending with ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk
with ``usage`` and no choices. A client that disconnects (mid-stream or not) aborts its request
on the coordinator.

**Chat prompt.** A tokenizer with a chat template renders ``messages`` with it. One without
(the shipped model has none) uses this default, a play-script layout like the corpus the
shipped model learnt from: each message as its ``name`` (or its role, capitalised) and a colon
on one line, its text on the next, then a blank line; then ``Assistant:`` and a newline to
continue from::

    System:
    Answer in verse.

    ROMEO:
    What light through yonder window breaks?

    Assistant:

**The ``specmoe`` field.** Every non-streamed response, and the last chunk of a stream (the
one with ``finish_reason``), carries SpecMoE's figures for that request next to ``usage``:

    "specmoe": {"rounds": 9,              decode rounds (one verification each) that committed tokens
                "drafted": 24,            draft tokens proposed over those rounds
                "accepted": 19,           draft tokens that verification accepted
                "accepted_per_round": 2.1,  accepted / rounds
                "acceptance_rate": 0.79,  accepted / drafted
                "tokens_per_round": 3.1,  committed tokens / rounds (accepted + bonus)
                "readmitted": 0,          times it moved to another decoder after a failure
                "time_to_first_token_s": 0.08, "time_per_output_token_s": 0.01, "total_s": 0.4}

Expert bytes are counted per decoder, not per request (the requests of a round share every
fetch); the coordinator's ``decoder_metrics()`` reports them.

**Errors** are OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad parameter, malformed JSON, a body that is not UTF-8 or a prompt longer than the model's
context (code ``context_length_exceeded``); 401 for a missing or wrong key; 404 for an unknown
model (``model_not_found``) or route; 413 for a body over ``max_body_bytes``; 429 when the
coordinator's queue is full (``Retry-After: 1``); 503 when the coordinator cannot be reached.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the routes' annotations here
from ray import serve

from deploy.serve.protocol import (
    ApiError,
    OpenAIRequest,
    Response,
    chat_prompt,
    check_prompt_ids,
    max_new_tokens,
    parse_request,
    specmoe_figures,
)

MAX_BODY_BYTES = 4 << 20
POLL_S = 1.0  # one long poll of the coordinator
INGRESS = "SpecMoEIngress"
ARGS = ("spec", "spec_file", "api_key", "model_name", "max_body_bytes")


@dataclass(frozen=True)
class IngressConfig:
    """What every replica is given: the deployment spec (as plain data) and the HTTP settings."""

    spec: dict
    api_key: str | None = None
    model_name: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    reconnect_s: float = 60.0  # how long a call waits for a restarting coordinator before a 503

    def __post_init__(self):
        from cluster.deployment import DeploymentSpec

        spec = DeploymentSpec.from_dict(self.spec)  # ValueError naming the bad field
        if spec.decoders.count < 1:
            raise ValueError("the Serve app needs decoders: decoders.count must be >= 1 (0 brings up stores only)")
        for key in ("api_key", "model_name"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key} must be a non-empty string or null, got {value!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if isinstance(self.reconnect_s, bool) or not isinstance(self.reconnect_s, (int, float)) or self.reconnect_s <= 0:
            raise ValueError(f"reconnect_s must be a number of seconds > 0, got {self.reconnect_s!r}")

    @classmethod
    def from_args(cls, args: dict) -> IngressConfig:
        from cluster.deployment import DeploymentSpec

        if not isinstance(args, dict):
            raise ValueError(f"the app's args must be a mapping, got {type(args).__name__}")
        unknown = sorted(set(args) - set(ARGS))
        if unknown:
            raise ValueError(f"unknown app args: {', '.join(unknown)}; allowed: {', '.join(ARGS)}")
        if ("spec" in args) == ("spec_file" in args):
            raise ValueError("give the deployment as args.spec (a DeploymentSpec as a mapping) or args.spec_file "
                             "(a YAML or JSON file), exactly one of them")
        spec = args["spec"] if "spec" in args else DeploymentSpec.from_file(args["spec_file"]).to_dict()
        rest = {k: args[k] for k in ("api_key", "model_name", "max_body_bytes") if k in args}
        return cls(spec=spec or {}, **rest)


def build_app(args: dict):
    """The Serve application (``serve run``/``serve deploy`` call this with the config's ``args``)."""
    return SpecMoEIngress.bind(IngressConfig.from_args(args))


def start_or_attach(spec, build=None, attempts: int = 8):
    """``build_deployment(spec)``, again while another process is starting the same named
    actors (two replicas that start together both find a name free, one of them loses the
    race with ``ActorAlreadyExistsError``; its next try attaches to the winner's actors)."""
    from ray.exceptions import ActorAlreadyExistsError

    if build is None:
        from cluster.deployment import build_deployment as build
    for attempt in range(attempts):
        try:
            return build(spec)
        except ActorAlreadyExistsError:
            if attempt + 1 == attempts:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ServedModel:
    """The model as HTTP clients see it: its id, context length, vocabulary and tokenizer."""

    name: str
    max_model_len: int
    vocab_size: int
    tokenizer: object
    created: int

    @classmethod
    def load(cls, spec, name: str | None) -> ServedModel:
        from specmoe.engine import load_tokenizer
        from specmoe.config import default_max_model_len
        from specmoe.loader import read_config

        hf = read_config(spec.model.path)
        max_len = default_max_model_len(hf, spec.model.max_model_len)  # what the decoders serve
        return cls(name or Path(spec.model.path).name, max_len, hf.vocab_size, load_tokenizer(spec.model.path),
                   int(time.time()))

    def prompt_ids(self, request: OpenAIRequest) -> list[int]:
        """The request's prompt as token ids (a chat through its template); 400 when unusable."""
        param = request.prompt_param
        if request.kind == "chat":
            prompt = self._render(request.messages)
        else:
            prompt = request.prompt
        if isinstance(prompt, list):
            check_prompt_ids(prompt, param, self.vocab_size)
            return prompt
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", param=param)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)  # as the coordinator encodes text
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param=param)
        return ids

    def _render(self, messages) -> str:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template; use /v1/completions with token ids",
                           param="messages")
        try:
            return chat_prompt(self.tokenizer, messages)
        except Exception as err:  # noqa: BLE001 - a model's own template may refuse a conversation (jinja errors)
            raise ApiError(400, f"the model's chat template refused these messages: {err}", param="messages") from None

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "specmoe",
                "max_model_len": self.max_model_len}


@serve.deployment(name=INGRESS, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class SpecMoEIngress:
    """One replica of the HTTP front: checks requests, submits them to the coordinator, and
    answers from its long polls. Holds no request state between calls (any replica serves any
    request); the coordinator owns the requests."""

    async def __init__(self, config: IngressConfig):
        from cluster.deployment import DeploymentSpec

        self.config = config
        self.spec = DeploymentSpec.from_dict(config.spec)
        deployment = await asyncio.to_thread(start_or_attach, self.spec)
        self.coordinator = deployment.coordinator
        self.model = await asyncio.to_thread(ServedModel.load, self.spec, config.model_name)

    def __serve_build_asgi_app__(self):
        return make_api(self)

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, kind: str, http):
        from fastapi.responses import JSONResponse, StreamingResponse

        self.authorize(http)
        request = parse_request(kind, await read_json(http, self.config.max_body_bytes))
        if request.model != self.model.name:
            raise ApiError(404, f"the model {request.model!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")
        prompt_ids = self.model.prompt_ids(request)
        params = request.params(max_new_tokens(request, len(prompt_ids), self.model.max_model_len))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        await self.call("submit", rid, prompt_ids, params)
        response = Response(rid, self.model.name, kind)
        if request.stream:
            events = self.events(rid, response, len(prompt_ids), request.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, tokens, last = [], 0, None
        async for chunk in self.chunks(rid):
            text.append(chunk.text)
            tokens += len(chunk.token_ids)
            last = chunk
        _raise_if_failed(last)
        return JSONResponse(response.full("".join(text), last.finish_reason, len(prompt_ids), tokens, last.metrics))

    async def chunks(self, rid: str):
        """The request's chunks from the coordinator, until finished; aborts it there when the
        consumer stops early (a client that went away cancels the task that iterates)."""
        seen = chars = 0
        finished = False
        try:
            while not finished:
                chunk = (await self.call("poll", {rid: (seen, chars)}, POLL_S))[rid]
                seen, chars = seen + len(chunk.token_ids), chars + len(chunk.text)
                finished = chunk.finished
                if chunk.token_ids or chunk.text or finished:
                    yield chunk
        finally:
            if not finished:
                try:
                    self.coordinator.abort.remote(rid)  # fire and forget: the caller may be cancelled
                except Exception:  # noqa: BLE001 - best effort: the coordinator also reaps abandoned requests
                    pass

    async def events(self, rid: str, response: Response, prompt_tokens: int, include_usage: bool):
        """Server-sent events for a streamed request, ending with ``data: [DONE]``."""
        extra = {"usage": None} if include_usage else {}
        tokens = 0
        chunks = self.chunks(rid)
        try:
            if response.kind == "chat":
                yield _sse(response.chunk(None, first=True, **extra))
            async for chunk in chunks:
                tokens += len(chunk.token_ids)
                if chunk.finished:
                    _raise_if_failed(chunk)
                    if chunk.text:
                        yield _sse(response.chunk(chunk.text, **extra))
                    yield _sse(response.chunk(None, chunk.finish_reason, specmoe=specmoe_figures(chunk.metrics), **extra))
                    if include_usage:
                        yield _sse(response.usage_chunk(prompt_tokens, tokens))
                elif chunk.text:
                    yield _sse(response.chunk(chunk.text, **extra))
        except ApiError as err:
            yield _sse(err.body())
        except Exception as err:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            yield _sse(ApiError(500, f"internal error: {type(err).__name__}: {err}", "server_error").body())
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    async def call(self, method: str, *args):
        """One coordinator call. While it restarts, the same call again (up to ``reconnect_s``,
        then 503); ``Overloaded`` is a 429 and a ``ValueError`` of the request a 400."""
        from ray.exceptions import RayActorError, RayTaskError

        from actors.coordinator import Overloaded

        deadline = time.monotonic() + self.config.reconnect_s
        while True:
            try:
                return await getattr(self.coordinator, method).remote(*args)
            except RayActorError:
                if time.monotonic() > deadline:
                    raise ApiError(503, "the coordinator is unavailable; try again later", "server_error",
                                   code="unavailable") from None
                await asyncio.sleep(0.2)
                self._refresh()
            except RayTaskError as err:
                if isinstance(err.cause, Overloaded):
                    raise ApiError(429, f"the server is overloaded: {err.cause}; retry later", "rate_limit_error",
                                   code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
                if isinstance(err.cause, ValueError):
                    raise ApiError(400, str(err.cause)) from None
                raise

    def _refresh(self) -> None:
        import ray

        try:
            self.coordinator = ray.get_actor(self.spec.coordinator_name, namespace=self.spec.namespace)
        except ValueError:
            pass  # not registered again yet

    def authorize(self, http) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = http.headers.get("authorization")
        if not header:
            raise ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- reports ----------------------------------------------------------------------------

    async def health(self):
        from fastapi.responses import JSONResponse

        try:
            state = await asyncio.wait_for(self.coordinator.health.remote(), 5.0)
        except Exception as err:  # noqa: BLE001 - any failure to answer is "unavailable"
            return JSONResponse({"status": "unavailable", "error": f"{type(err).__name__}: {err}"}, status_code=503)
        ok = state.get("live_decoders", 0) > 0
        return JSONResponse({"status": "ok" if ok else "unavailable", "model": self.model.name, **state},
                            status_code=200 if ok else 503)

    def models(self, http) -> dict:
        self.authorize(http)
        return {"object": "list", "data": [self.model.card()]}

    def model_card(self, http, model_id: str) -> dict:
        self.authorize(http)
        if model_id != self.model.name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {self.model.name!r}",
                           param="model", code="model_not_found")
        return self.model.card()


def make_api(ingress: SpecMoEIngress):
    """The FastAPI app of one replica: routes, and every error as OpenAI's envelope."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="SpecMoE", docs_url=None, redoc_url=None, openapi_url=None)

    def envelope(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def on_api_error(_, err: ApiError):
        return envelope(err)

    async def on_validation(_, err: RequestValidationError):
        first = (err.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return envelope(ApiError(400, f"invalid request: {first.get('msg', err)}", param=param))

    async def on_http(_, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return envelope(ApiError(err.status_code, str(err.detail), kind, headers=getattr(err, "headers", None)))

    async def on_error(_, err: Exception):
        return envelope(ApiError(500, f"internal error: {type(err).__name__}: {err}", "server_error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_error)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await ingress.generate("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await ingress.generate("chat", request)

    @app.get("/v1/models")
    async def models(request: Request):
        return ingress.models(request)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        return ingress.model_card(request, model_id)

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return await ingress.health()

    return app


async def read_json(http, limit: int):
    """The body as JSON, reading at most ``limit`` bytes: 413 past it, 400 when it is not
    UTF-8 or not JSON."""
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)
    body = bytearray()
    async for piece in http.stream():
        body += piece
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {err.start}); send JSON encoded as UTF-8") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ApiError(400, f"we could not parse the JSON body of your request ({err}); send a JSON object") from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body ({size} bytes) is larger than this server accepts ({limit} bytes)",
                    code="request_too_large")


def _raise_if_failed(chunk) -> None:
    if chunk is None or chunk.finish_reason == "error":
        lines = (chunk.error or "").strip().splitlines() if chunk is not None else []
        detail = lines[-1] if lines else "no answer"  # the error itself, not the remote traceback
        raise ApiError(500, f"the request failed on its decoder: {detail}", "server_error")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# -- specmoe serve -----------------------------------------------------------------------------


def serve_locally(spec_file: str | None, port: int, api_key: str | None, model_name: str | None,
                  stop: threading.Event) -> int:
    """``specmoe serve``: a local multi-node cluster with the spec's store and decoder nodes,
    this app on 127.0.0.1:``port``, until Ctrl-C or ``stop`` is set (either stops the cluster)."""
    from cluster.deployment import DeploymentSpec
    from cluster.local import ClusterSpec, LocalCluster

    spec = DeploymentSpec.from_file(spec_file) if spec_file else DeploymentSpec()
    args = {"spec": spec.to_dict(), "api_key": api_key} | ({"model_name": model_name} if model_name else {})
    app = build_app(args)  # checks the spec and the key before anything starts
    _check_port_free(port)
    with LocalCluster(ClusterSpec(stores=spec.stores.count, decoders=spec.decoders.count)):
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="specmoe", route_prefix="/")
        name = model_name or Path(spec.model.path).name
        print(f"[specmoe] serving {name!r} at http://127.0.0.1:{port}/v1 (OpenAI API); Ctrl-C stops", file=sys.stderr)
        try:
            while not stop.wait(1.0):  # Ctrl-C raises here; a swallowed one still sets stop
                pass
        finally:
            print("[specmoe] stopping the app and the cluster", file=sys.stderr)
    return 0


def _check_port_free(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {port}")
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"port {port} on 127.0.0.1 is in use; choose another --port") from None
