"""A fake ``Decoder``: the round-level interface with scripted tokens and injectable failures.

The next token is a pure function of the sequence so far (prompt + every token before it),
like greedy decoding, so a request re-admitted elsewhere from prompt + committed tokens
continues exactly as it would have. Each round commits 1..``per_round`` tokens (as if some
draft tokens were accepted) and reports ``drafted``/``accepted`` accordingly.

``FakeHandle`` gives it the shape of a Ray actor handle: ``handle.step.remote()`` returns an
awaitable, which the coordinator awaits; each call takes ``latency_s`` and at most one call
runs at a time, as on a Ray actor.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ray.exceptions import ActorDiedError

from actors.decoder import DecoderDead, DecoderRoundError
from specmoe.engine import StepOutput
from specmoe.sampling import SamplingParams

LETTERS = list(range(65, 91))  # "a".."z" in the shipped model's byte-level vocabulary


def letter_script(tokens: list[int]) -> int:
    """A deterministic next token: a letter chosen from the sequence so far."""
    return LETTERS[(sum(tokens) * 31 + len(tokens)) % len(LETTERS)]


@dataclass
class FakeSeq:
    request_id: str
    tokens: list[int]
    params: SamplingParams
    produced: int = 0


@dataclass
class FakeDecoder:
    script: object = letter_script  # tokens so far -> next token
    per_round: int = 3  # at most this many tokens commit per round
    die_at_round: int | None = None  # from this round on, every call raises ActorDiedError
    fail_rounds: set[int] = field(default_factory=set)  # rounds that raise DecoderRoundError (nothing changes)
    dead_error: bool = False  # die with DecoderDead (the decoder's own verdict) instead
    seqs: dict[str, FakeSeq] = field(default_factory=dict)
    rounds: int = 0
    calls: list[tuple] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    dead: bool = False

    def _check(self) -> None:
        if self.dead:
            raise DecoderDead("fake decoder is dead") if self.dead_error else ActorDiedError()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._check()
        self.calls.append(("add", request_id, len(prompt_ids), params.max_new_tokens))
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already being served by this decoder")
        if len(prompt_ids) > 1000:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) exceeds max_model_len (1000)")
        self.seqs[request_id] = FakeSeq(request_id, list(prompt_ids), params)

    def abort(self, request_id: str) -> None:
        self._check()
        self.calls.append(("abort", request_id))
        self.seqs.pop(request_id, None)

    def step(self) -> list[StepOutput]:
        self._check()
        self.rounds += 1
        if self.die_at_round is not None and self.rounds >= self.die_at_round:
            self.dead = True
            self._check()
        if self.rounds in self.fail_rounds:
            raise DecoderRoundError(f"fake round {self.rounds} failed; requests intact")
        self.calls.append(("step", sorted(self.seqs)))
        self.batch_sizes.append(len(self.seqs))
        outputs = []
        for seq in list(self.seqs.values()):
            n = 1 + (self.rounds + len(seq.tokens)) % self.per_round
            new, reason = [], None
            for _ in range(n):
                token = self.script(seq.tokens)
                seq.tokens.append(token)
                seq.produced += 1
                new.append(token)
                if token in seq.params.stop_token_ids:
                    reason = "stop"
                elif seq.produced >= seq.params.max_new_tokens:
                    reason = "length"
                if reason:
                    break
            if reason:
                del self.seqs[seq.request_id]
            outputs.append(StepOutput(seq.request_id, new, reason is not None, reason, drafted=self.per_round - 1,
                                      accepted=len(new) - 1))
        return outputs

    def health(self) -> dict:
        return {"alive": not self.dead, "running": len(self.seqs), "waiting": 0}

    def metrics(self) -> dict:
        return {"rounds": self.rounds}


class _Method:
    def __init__(self, handle: FakeHandle, name: str):
        self.handle, self.name = handle, name

    def remote(self, *args):
        return self.handle._run(self.name, args)


class FakeHandle:
    """``decoder.method.remote(*args)`` -> awaitable, one call at a time, ``latency_s`` each."""

    def __init__(self, decoder: FakeDecoder, latency_s: float = 0.002):
        self.decoder, self.latency_s = decoder, latency_s
        self.in_flight = 0
        self.max_in_flight = 0

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    async def _run(self, name: str, args: tuple):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
            return getattr(self.decoder, name)(*args)
        finally:
            self.in_flight -= 1
