"""The ``Coordinator``: admission, continuous batching over ``Decoder`` actors, streaming of
committed tokens, fault handling, and the request journal.

A plain asyncio class (``coordinator_actor()`` makes it a Ray actor), so tests drive it with
fake decoders and no cluster. It owns every request's **committed** tokens (those a decoder's
round returned: accepted draft tokens and the bonus); they are the only tokens clients see
and the rollback point when anything below fails.

* **Admission.** ``submit`` appends to a bounded queue; when ``max_queue`` requests already
  wait it raises ``Overloaded`` (queued requests, not running ones, count).
* **Batching.** One task per decoder runs rounds back to back: at each round boundary it
  sends that decoder's aborts, then its new requests, then one ``step()``. A queued request
  goes to the live decoder with the fewest outstanding tokens (remaining ``max_new_tokens``
  over the requests it holds), at most ``max_batch_per_decoder`` per decoder.
* **Streaming.** ``poll({id: (tokens_seen, chars_seen)}, timeout_s)`` is a long poll: it
  returns, per request, the committed token ids and the text past the client's cursor, as
  soon as there are any. A long poll rather than a Ray streaming generator because a call
  keyed by a cursor is idempotent: a client whose coordinator restarted simply asks again
  with the same cursor and gets no duplicate and no missing piece, and the same call serves
  a driver, a Serve replica or a remote process. Text is held back while it ends in an
  incomplete character or in what may be the start of a stop string.
* **Cancellation.** ``abort(id)``, or a client that stops polling for ``client_timeout_s``,
  finishes the request with reason ``"abort"`` and frees its slot for a queued request.
* **Stop strings** are matched on the detokenized committed text; the text is cut before
  the stop string, the token ids end with the token that completed it, and the request is
  aborted on its decoder.

Faults:

* A decoder whose call raises ``RayActorError`` (died, restarting, unreachable) or
  ``DecoderDead`` is dead: its requests go back to the front of the queue and are placed on
  a live decoder with prompt + committed tokens as the prompt and the remaining
  ``max_new_tokens``. Clients see the same stream (committed tokens never change); the
  output is unchanged under greedy decoding and for seeded requests (a seeded token is
  drawn with noise keyed by seed and position, ``specmoe.sampling``); an unseeded sampled
  request draws its remaining tokens afresh (same distribution). A dead decoder is probed with ``health()`` and used again
  once it answers alive (a restarted actor holds no requests).
* ``DecoderRoundError`` (the decoder's requests are intact) and any other error of a
  round: the round is retried after a back-off; ``decoder_failures`` consecutive failures
  declare the decoder dead as above.
* The coordinator itself: see ``Journal``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from ray.exceptions import RayActorError

from actors.decoder import DecoderDead, DecoderRoundError
from actors.telemetry import CoordinatorTelemetry
from specmoe.detokenizer import IncrementalDetokenizer
from specmoe.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


class Overloaded(Exception):
    """The admission queue is full; try again later. Raised by ``Coordinator.submit`` (through
    Ray it arrives as a ``RayTaskError`` that is also an ``Overloaded``)."""


class UnknownRequest(KeyError):
    """A request id the coordinator does not hold (never submitted, or forgotten)."""


@dataclass(frozen=True)
class GenerationParams(SamplingParams):
    """``SamplingParams`` plus stop strings, which the coordinator applies on detokenized text."""

    stop: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @classmethod
    def of(cls, params: SamplingParams | dict | None) -> GenerationParams:
        if params is None:
            return cls()
        if isinstance(params, dict):
            return cls(**params)
        if isinstance(params, cls):
            return params
        if isinstance(params, SamplingParams):
            return cls(**dataclasses.asdict(params))
        raise ValueError(f"params must be GenerationParams, SamplingParams or a dict, got {type(params).__name__}")

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """What a decoder runs: these parameters without stop strings, for ``max_new_tokens``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}
        return SamplingParams(**(fields | {"max_new_tokens": max_new_tokens}))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class Chunk:
    """What a poll returns for one request: what it gained past the client's cursor."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    metrics: dict | None = None  # when finished


# -- the journal -------------------------------------------------------------------------------


class Journal:
    """An append-only msgpack file of request records; what a restarted coordinator resumes from.

    Records: ``{"op": "submit", "id", "prompt", "params"}``, ``{"op": "commit", "id",
    "tokens", "drafted", "accepted"}``, ``{"op": "finish", "id", "reason", "error"}``. Each is
    written and flushed before the coordinator acknowledges it (``submit`` returns only after
    its record is written; committed tokens are visible to polls only after their record is),
    so everything a client was told is in the journal. A torn last record (a crash mid-write)
    is dropped on open. On open the file is compacted to one submit + commit (+ finish) per
    request still held; it is compacted again when it grows past ``compact_every`` records.

    Preserved across a coordinator restart: every acknowledged request, its parameters, its
    committed tokens and their drafted/accepted counts, finish reasons, and so every
    client's cursor. Lost: rounds a decoder ran whose outputs the old coordinator had not
    yet recorded (they are recomputed: identical under greedy decoding and for seeded
    requests; an unseeded sampled request draws them afresh), requests whose ``submit`` had not
    returned (a client retries them with the same id; ``submit`` is idempotent), timing
    metrics (time to first token of a resumed request counts from the restart), and the
    coordinator's counters. Flushed, not fsynced: it survives the process, not the machine.

    Decoders outlive a coordinator and still hold the requests it had placed. A restarted
    coordinator places every unfinished request again under a new decoder-side id
    (``{id}@{incarnation}.{n}``); a copy from before the restart is aborted on its decoder the
    first time it shows up in a round (until then it holds a slot there). The default file
    lies under the Ray session's folder of the node the coordinator runs on: a coordinator
    restarted on another machine starts empty unless ``CoordinatorSpec.journal`` names a
    path both can reach.
    """

    def __init__(self, path: str | Path, compact_every: int = 10_000):
        self.path = Path(path)
        self.compact_every = compact_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = 0
        self.file = None

    def replay(self) -> list[dict]:
        """The records in the file, in order; a torn tail is dropped (and cut from the file)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        records, good = [], 0
        try:
            for record in unpacker:
                if not isinstance(record, dict) or "op" not in record:
                    break
                records.append(record)
                good = unpacker.tell()
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError):
            pass
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file with ``records`` (atomically: write aside, then rename)."""
        if self.file is not None:
            self.file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            for record in records:
                f.write(msgpack.packb(record))
        os.replace(tmp, self.path)
        self.file = open(self.path, "ab")
        self.records = len(records)

    def append(self, *records: dict) -> None:
        for record in records:
            self.file.write(msgpack.packb(record))
        self.file.flush()
        self.records += len(records)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def default_journal_path() -> Path:
    """Under the Ray session's folder, named after this actor, when running as a named actor
    (a restart finds it, a new cluster does not); otherwise a fresh temporary file."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        name = ctx.get_actor_name() if ray.is_initialized() else None
    except Exception:
        name = None
    if name:
        return Path(ctx.get_temp_dir()) / ctx.get_session_name() / "specmoe" / f"{ctx.namespace}-{name}.journal"
    fd, path = tempfile.mkstemp(prefix="specmoe-coordinator-", suffix=".journal")
    os.close(fd)
    return Path(path)


# -- requests and decoders -------------------------------------------------------------------


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: GenerationParams
    detok: IncrementalDetokenizer
    tokens: list[int] = field(default_factory=list)  # committed
    text: str = ""  # detokenized committed text (cut before a stop string)
    finish_reason: str | None = None
    error: str | None = None
    stop_hit: bool = False  # a stop string ended it
    decoder: int | None = None  # index of the decoder holding it
    key: str | None = None  # its id on that decoder
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    readmitted: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.tokens)

    def visible_chars(self) -> int:
        """Text a client may see: all of it when finished; else held back while its end may
        be the start of a stop string."""
        if self.finished:
            return len(self.text)
        held = max((n for s in self.params.stop for n in range(len(s) - 1, 0, -1) if self.text.endswith(s[:n])), default=0)
        return len(self.text) - held

    def metrics(self) -> dict:
        now = time.monotonic()
        first = self.first_token_at
        end = self.finished_at or now
        n = len(self.tokens)
        return {
            "prompt_tokens": len(self.prompt),
            "output_tokens": n,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "tokens_per_round": n / self.rounds if self.rounds else 0.0,
            "readmitted": self.readmitted,
            "time_to_first_token_s": (first - self.submitted_at) if first is not None else None,
            "time_per_output_token_s": (end - first) / (n - 1) if first is not None and n > 1 else None,
            "total_s": end - self.submitted_at,
        }


@dataclass
class DecoderSlot:
    index: int
    handle: object
    live: bool = True
    failures: int = 0  # consecutive failed rounds
    held: dict[str, Request] = field(default_factory=dict)  # decoder-side id -> request
    to_add: list[Request] = field(default_factory=list)
    to_abort: set[str] = field(default_factory=set)
    task: asyncio.Task | None = None
    rounds: int = 0

    def outstanding(self) -> int:
        return sum(r.remaining for r in self.held.values())


def _dead(err: BaseException) -> bool:
    return isinstance(err, (RayActorError, DecoderDead))


async def _call(method, *args):
    """``await handle.method.remote(*args)``; works for Ray handles and for fakes whose
    ``.remote()`` returns an awaitable."""
    return await method.remote(*args)


# -- the coordinator ---------------------------------------------------------------------------


class Coordinator:
    """Admission, batching, streaming and fault handling over ``decoders`` (Ray handles, or
    fakes with the same ``.method.remote()`` shape). See the module docstring."""

    def __init__(self, decoders: list, spec, model_dir: str, tokenizer=None, client_timeout_s: float = 60.0,
                 retry_s: float = 0.05, probe_s: float = 1.0):
        if not decoders:
            raise ValueError("a coordinator needs at least one decoder")
        if client_timeout_s <= 0:
            raise ValueError(f"client_timeout_s must be > 0, got {client_timeout_s!r}")
        if tokenizer is None:
            from specmoe.engine import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
        self.spec = spec
        self.tokenizer = tokenizer
        self.client_timeout_s = client_timeout_s
        self.retry_s = retry_s
        self.probe_s = probe_s
        self.decoders = [DecoderSlot(i, h) for i, h in enumerate(decoders)]
        self.requests: dict[str, Request] = {}
        self.queue: deque[Request] = deque()
        self.counts = {"submitted": 0, "finished": 0, "aborted": 0, "failed": 0, "readmitted": 0, "rejected": 0}
        self.telemetry = CoordinatorTelemetry()  # Prometheus metrics (a no-op outside Ray)
        self.incarnation = 0
        self._keys = itertools.count()
        self._progress: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self.journal = Journal(spec.journal or default_journal_path())
        self._resume(self.journal.replay())

    # -- client API -------------------------------------------------------------------------

    async def submit(self, request_id: str, prompt: str | list[int], params: GenerationParams | SamplingParams | dict | None = None) -> str:
        """Admit a request (idempotent for the same id); raises ``Overloaded`` when the queue is full."""
        self._start()
        if not (isinstance(request_id, str) and request_id):
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        params = GenerationParams.of(params)
        if request_id in self.requests:
            return request_id  # a client retrying after losing its answer
        prompt_ids = self.encode(prompt)
        if len(self.queue) >= self.spec.max_queue:
            self.counts["rejected"] += 1
            self.telemetry.rejected()
            raise Overloaded(f"the admission queue is full ({len(self.queue)} of max_queue={self.spec.max_queue} waiting)")
        self.journal.append({"op": "submit", "id": request_id, "prompt": prompt_ids, "params": params.to_dict()})
        request = self._new_request(request_id, prompt_ids, params)
        self.queue.append(request)
        self.counts["submitted"] += 1
        self._admit()
        return request_id

    async def poll(self, cursors: dict[str, tuple[int, int]], timeout_s: float = 1.0) -> dict[str, Chunk]:
        """Per request, the committed tokens and text past ``cursors[id] = (tokens_seen,
        chars_seen)``; waits up to ``timeout_s`` for any of them to have something."""
        self._start()
        deadline = time.monotonic() + timeout_s
        while True:
            event = self._progress
            chunks = {rid: self._chunk(rid, *cursor) for rid, cursor in cursors.items()}
            ready = any(c.token_ids or c.text or c.finished for c in chunks.values())
            left = deadline - time.monotonic()
            if ready or left <= 0:
                return chunks
            try:
                await asyncio.wait_for(event.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def abort(self, request_id: str) -> None:
        """Finish a request with reason ``"abort"`` and free its slot; unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None and not request.finished:
            self._finish(request, "abort")
            self._admit()

    async def result(self, request_id: str) -> Chunk:
        """Everything a request has (cursor 0), without waiting."""
        return self._chunk(request_id, 0, 0)

    async def metrics(self) -> dict:
        running = sum(len(d.held) for d in self.decoders)
        return {
            "queued": len(self.queue),
            "running": running,
            **self.counts,
            "incarnation": self.incarnation,
            "decoders": [
                {"index": d.index, "live": d.live, "running": len(d.held), "outstanding_tokens": d.outstanding(),
                 "rounds": d.rounds, "failures": d.failures}
                for d in self.decoders
            ],
        }

    async def decoder_metrics(self) -> list[dict | None]:
        """Each decoder's own ``metrics()`` (None for one that does not answer)."""
        async def one(d: DecoderSlot):
            try:
                return await _call(d.handle.metrics)
            except Exception:  # noqa: BLE001 - a report, not a round: a dead decoder reports nothing
                return None

        return list(await asyncio.gather(*(one(d) for d in self.decoders)))

    async def health(self) -> dict:
        self._start()
        return {"alive": True, "live_decoders": sum(d.live for d in self.decoders), "queued": len(self.queue)}

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; send token ids instead of text")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
        if not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"a prompt must be non-empty text or a non-empty list of token ids >= 0, got {prompt!r:.80}")
        return ids

    def shutdown(self) -> None:
        for task in list(self._tasks) + [self._reaper]:
            if task is not None:
                task.cancel()
        self.journal.close()

    # -- scheduling -------------------------------------------------------------------------

    def _start(self) -> None:
        """Start the background work on the running loop (a Ray actor's ``__init__`` runs off it)."""
        if self._progress is None:
            self._progress = asyncio.Event()
            self._reaper = asyncio.ensure_future(self._reap())
            self._admit()
            for d in self.decoders:
                self._wake(d)

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _admit(self) -> None:
        """Place queued requests on the live decoder with the fewest outstanding tokens."""
        if self._progress is None:
            return
        cap = self.spec.max_batch_per_decoder
        while self.queue:
            free = [d for d in self.decoders if d.live and len(d.held) < cap]
            if not free:
                break
            d = min(free, key=lambda d: (d.outstanding(), d.index))
            request = self.queue.popleft()
            request.decoder, request.key = d.index, f"{request.id}@{self.incarnation}.{next(self._keys)}"
            d.held[request.key] = request
            d.to_add.append(request)
            self._wake(d)
        self.telemetry.queue(len(self.queue), sum(len(d.held) for d in self.decoders))

    def _wake(self, d: DecoderSlot) -> None:
        if d.live and (d.held or d.to_abort) and (d.task is None or d.task.done()):
            d.task = self._spawn(self._drive(d))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drive(self, d: DecoderSlot) -> None:
        """Rounds on one decoder, back to back, while it holds requests: aborts, adds, step."""
        while d.live and (d.held or d.to_abort):
            try:
                await self._send_aborts(d)
                await self._send_adds(d)
                if not d.held:
                    continue
                outputs = await _call(d.handle.step)
            except Exception as err:  # noqa: BLE001 - every failure is classified below
                if _dead(err) or d.failures + 1 >= self.spec.decoder_failures:
                    self._lose(d, err)
                    return
                d.failures += 1
                await asyncio.sleep(self.retry_s * 2 ** (d.failures - 1))
                continue
            d.failures = 0
            d.rounds += 1
            self._commit(d, outputs)
            self._admit()

    async def _send_aborts(self, d: DecoderSlot) -> None:
        while d.to_abort:
            key = next(iter(d.to_abort))
            await _call(d.handle.abort, key)
            d.to_abort.discard(key)

    async def _send_adds(self, d: DecoderSlot) -> None:
        adds, d.to_add = d.to_add, []
        for i, request in enumerate(adds):
            if request.key is None or d.held.get(request.key) is not request:
                continue  # aborted before it was sent
            try:
                await _call(d.handle.add_request, request.key, request.prompt + request.tokens,
                            request.params.sampling(request.remaining))
            except Exception as err:
                if _dead(err) or not isinstance(err, ValueError):
                    d.to_add = adds[i:] + d.to_add
                    raise
                del d.held[request.key]
                request.decoder = request.key = None
                self._finish(request, "error", str(err))

    def _commit(self, d: DecoderSlot, outputs: list) -> None:
        """Record a round's committed tokens (journal first), then make them visible."""
        records, done = [], []
        for out in outputs:
            request = d.held.get(out.request_id)
            if request is None:
                d.to_abort.add(out.request_id)  # a stale copy (aborted, or from before a restart)
                continue
            tokens, stopped = self._extend(request, out.new_token_ids)
            request.rounds += 1
            request.drafted += out.drafted
            request.accepted += out.accepted
            self.telemetry.round(len(tokens), out.drafted, out.accepted)
            if tokens and request.first_token_at is None:
                request.first_token_at = time.monotonic()
            records.append({"op": "commit", "id": request.id, "tokens": tokens, "drafted": out.drafted, "accepted": out.accepted})
            if out.finished:
                del d.held[request.key]
                request.decoder = request.key = None
            if stopped or out.finished:
                done.append((request, "stop" if stopped else out.finish_reason))
        self.journal.append(*records)
        for request, reason in done:
            self._finish(request, reason)  # a request still on its decoder is aborted there
        self._notify()

    def _extend(self, request: Request, new: list[int]) -> tuple[list[int], bool]:
        """Append committed tokens and their text; with stop strings, token by token, cutting
        at the token that completes one. Returns the tokens kept and whether a stop string hit."""
        stops = request.params.stop
        pieces = [[t] for t in new] if stops else [list(new)]
        kept = []
        for piece in pieces:
            if not piece:
                continue
            before = len(request.text)
            request.text += request.detok.push(piece)
            request.tokens += piece
            kept += piece
            if stops:
                start = max(0, before - max(len(s) for s in stops) + 1)
                hits = [i for i in (request.text.find(s, start) for s in stops) if i >= 0]
                if hits:
                    request.text = request.text[: min(hits)]
                    request.stop_hit = True
                    return kept, True
        return kept, False

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.finished:
            return
        if request.key is not None:
            d = self.decoders[request.decoder]
            d.held.pop(request.key, None)
            d.to_abort.add(request.key)
            self._wake(d)
            request.decoder = request.key = None
        if request in self.queue:
            self.queue.remove(request)
        if not request.stop_hit:
            request.text += request.detok.flush()
        request.finish_reason, request.error = reason, error
        request.finished_at = time.monotonic()
        self.counts[{"abort": "aborted", "error": "failed"}.get(reason, "finished")] += 1
        self.telemetry.finished(reason, request.metrics())
        self.journal.append({"op": "finish", "id": request.id, "reason": reason, "error": error})
        if self.journal.records > self.journal.compact_every:
            self._compact()
        self._notify()

    def _lose(self, d: DecoderSlot, err: BaseException) -> None:
        """A dead decoder: its requests go back to the front of the queue; probe it for a comeback."""
        d.live = False
        lost = sorted(d.held.values(), key=lambda r: r.submitted_at)
        for request in reversed(lost):
            request.decoder = request.key = None
            request.readmitted += 1
            self.queue.appendleft(request)
        stale, d.held, d.to_add, d.to_abort = list(d.held), {}, [], set()
        self.counts["readmitted"] += len(lost)
        self._spawn(self._probe(d, stale))
        self._admit()
        self._notify()

    async def _probe(self, d: DecoderSlot, stale: list[str]) -> None:
        delay = self.probe_s
        while True:
            await asyncio.sleep(delay)
            try:
                for key in stale:  # a decoder declared dead by failed rounds still holds them
                    await _call(d.handle.abort, key)
                health = await _call(d.handle.health)
            except Exception:
                delay = min(delay * 2, 30 * self.probe_s)
                continue
            if health.get("alive", False):
                d.live, d.failures = True, 0
                self._admit()
                return

    async def _reap(self) -> None:
        """Abort requests whose client stopped polling; forget finished ones nobody polls."""
        while True:
            await asyncio.sleep(min(1.0, self.client_timeout_s / 4))
            now = time.monotonic()
            for request in list(self.requests.values()):
                if now - request.last_seen <= self.client_timeout_s:
                    continue
                if request.finished:
                    del self.requests[request.id]
                else:
                    self._finish(request, "abort", "the client went away")
            self._admit()

    # -- streaming --------------------------------------------------------------------------

    def _chunk(self, request_id: str, tokens_seen: int, chars_seen: int) -> Chunk:
        request = self.requests.get(request_id)
        if request is None:
            raise UnknownRequest(f"unknown request id {request_id!r}")
        request.last_seen = time.monotonic()
        visible = request.visible_chars()
        return Chunk(
            request_id,
            request.tokens[tokens_seen:],
            request.text[chars_seen:visible],
            request.finished,
            request.finish_reason,
            request.error,
            request.metrics() if request.finished else None,
        )

    # -- the journal ------------------------------------------------------------------------

    def _new_request(self, request_id: str, prompt: list[int], params: GenerationParams) -> Request:
        request = Request(request_id, prompt, params, IncrementalDetokenizer(self.tokenizer))
        self.requests[request_id] = request
        return request

    def _resume(self, records: list[dict]) -> None:
        """Rebuild requests from the journal: unfinished ones queue again with their committed tokens."""
        for record in records:
            op, rid = record["op"], record.get("id")
            if op == "start":
                self.incarnation = record["incarnation"] + 1
            elif op == "submit" and rid not in self.requests:
                self._new_request(rid, record["prompt"], GenerationParams(**record["params"]))
            elif op == "commit" and rid in self.requests:
                request = self.requests[rid]
                self._extend(request, record["tokens"])
                request.rounds += 1
                request.drafted += record["drafted"]
                request.accepted += record["accepted"]
            elif op == "finish" and rid in self.requests:
                request = self.requests[rid]
                if not request.stop_hit:
                    request.text += request.detok.flush()
                request.finish_reason, request.error = record["reason"], record.get("error")
                request.finished_at = time.monotonic()
        for request in self.requests.values():
            if not request.finished:
                request.readmitted += bool(request.tokens)
                self.queue.append(request)
        self._compact()

    def _compact(self) -> None:
        records = [{"op": "start", "incarnation": self.incarnation}]
        for r in self.requests.values():
            records.append({"op": "submit", "id": r.id, "prompt": r.prompt, "params": r.params.to_dict()})
            if r.tokens:
                records.append({"op": "commit", "id": r.id, "tokens": r.tokens, "drafted": r.drafted, "accepted": r.accepted})
            if r.finished:
                records.append({"op": "finish", "id": r.id, "reason": r.finish_reason, "error": r.error})
        self.journal.rewrite(records)


def coordinator_actor(**options):
    """``Coordinator`` as an async Ray actor (``num_cpus=0``; it runs no model)."""
    import ray

    return ray.remote(num_cpus=0, **options)(Coordinator)
