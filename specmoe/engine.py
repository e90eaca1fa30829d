"""The generation engine: continuous batching of ragged sequences over one model and KV cache.

Every ``step()`` is one round for all scheduled sequences, in every mode:

    draft -> verify -> accept -> roll back -> adapt

Drafting happens only in ``specmoe`` mode (k > 0) and only for running sequences; the
verification pass is one ragged forward in which newly admitted sequences contribute their
whole prompt (prefill is verification of a long draft) and running ones their last token
plus their draft. With k = 0 a round is plain decoding. Words as in ``specmoe.speculative``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specmoe.adaptive import ExpertTraffic, RoundTraffic, SpeculationController
from specmoe.config import DecoderConfig, EngineConfig, default_max_model_len
from specmoe.kv_cache import KVCache
from specmoe.loader import load_model, read_config
from specmoe.metrics import RoundCounters
from specmoe.sampling import SamplingParams, position_noise, sample
from specmoe.speculative import accept_greedy, accept_sampled, pad_drafts


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop token), "length" or "abort"
    draft: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # [V] per draft token (sampling)
    noise: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> its Gumbel noise [V] (seeded sampling)
    accepted: int = 0  # of this round's draft, tokens accepted and emitted (none past a stop)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class StepOutput:
    """What one request gained in one round: committed tokens only (accepted draft tokens and
    the bonus, cut at a stop), with the round's speculation counts for this request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    drafted: int = 0  # draft tokens this request proposed this round
    accepted: int = 0  # of them, accepted and emitted (none past a stop)


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None


class Engine:
    """Generate from a model with continuous batching. No Ray here: actors wrap this class.

    ``fetch(layer, experts) -> {expert: Future[(gate_up, down)]}`` supplies remote experts in
    the non-resident modes; without one they are read from the checkpoint in-process.
    """

    def __init__(self, config: EngineConfig, model=None, tokenizer=None, fetch=None):
        self.config = config
        dec: DecoderConfig = config.decoder
        self.hf_config = read_config(config.model) if model is None else model.config
        if model is None:
            model = load_model(config.model, config.dtype, config.device, experts=not dec.mode_spec.offloaded)
        self.model = model
        self.runtime = None
        if dec.mode_spec.offloaded:
            from specmoe.offload import attach_runtime, checkpoint_fetcher

            compute = getattr(fetch, "compute", None)
            fetch = fetch or checkpoint_fetcher(config.model)
            self.runtime = attach_runtime(model, fetch, dec, config.device, compute)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(config.model, self.hf_config)
        self.max_model_len = default_max_model_len(self.hf_config, config.max_model_len)
        layers, kv_heads, head_dim = model.kv_shape()
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(layers, config.max_batch_size, self.max_model_len, kv_heads, head_dim, dtype, config.device)
        self.controller = speculation_controller(dec, self.runtime, fetch, self.hf_config.num_experts_per_tok)
        self._seen = (None, 0.0, 0, 0)  # the runtime's counters at the end of the last round
        self.counters = RoundCounters()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises ValueError (and queues nothing) when it cannot be served."""
        prompt_ids = self.encode(prompt)
        vocab = self.hf_config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        # every mode serves the same requests: drafts stay within the tokens still to come (see _draft)
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens})"
                f" exceeds max_model_len ({self.max_model_len})"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.waiting.append(Sequence(request_id, prompt_ids, params, generator=params.generator()))
        return request_id

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer; pass token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> None:
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        for seq in [s for s in self.running if s.request_id == request_id]:
            self._finish(seq, "abort")

    # -- the round --------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One round for every scheduled sequence; returns what each one gained.

        Atomic: if anything in the round raises (a fetch that fails, say), every request is
        put back as it was before the round (queue position, committed tokens, KV length,
        sampling generator; drafts dropped), the runtime forgets the round's fetches, and
        the error propagates. The next ``step()`` runs the round again.
        """
        undo = self._round_undo()
        try:
            seqs = self._schedule()
            if not seqs:
                return []
            started = time.perf_counter()
            k = self.controller.choose() if self.config.decoder.speculative else 0
            prefill = any(not s.output for s in seqs)
            self._draft(seqs, k)
            drafted = time.perf_counter()
            logits = self._verify(seqs)  # [B, k+1, V]
            verdict = self._accept(seqs, logits)
            outputs = self._roll_back(seqs, verdict)
            self._adapt(k, seqs, verdict.accepted, drafted - started, time.perf_counter() - drafted, prefill)
            return outputs
        except BaseException:
            undo()
            raise

    def _round_undo(self) -> Callable[[], None]:
        """What ``step`` calls to put every request back as it is now. KV entries below each
        sequence's length are never written by a round, so lengths are all the cache needs."""
        waiting, running, cache = list(self.waiting), list(self.running), self.cache.snapshot()
        saved = [(s, s.slot, len(s.output), s.finish_reason, s.generator.get_state() if s.generator else None)
                 for s in waiting + running]

        def undo() -> None:
            for seq, slot, n_output, reason, generator in saved:
                seq.slot, seq.finish_reason = slot, reason
                del seq.output[n_output:]
                seq.draft, seq.draft_probs = [], []
                if generator is not None:
                    seq.generator.set_state(generator)
            self.waiting, self.running = deque(waiting), running
            self.cache.restore(cache)
            if self.runtime is not None:
                self.runtime.abandon_round()

        return undo

    def _draft(self, seqs: list[Sequence], k: int) -> None:
        """Draft up to k tokens per running sequence in draft routing; KV entries are scratch.

        After its last draft token a sequence takes one more draft step whose logits are
        dropped: it only routes d_k, so that the predicted sets cover every position that
        verification will process (t(n-1), d_1..d_k).

        Room: a sequence of n tokens drafts at most ``max_new_tokens - len(output) - 1`` tokens
        (a draft never runs past the tokens still to come; the round's bonus is the last one),
        and at most ``max_model_len - n``: drafting and verification write positions n-1 ..
        n-1+k, all below max_model_len.
        """
        for seq in seqs:
            seq.draft, seq.draft_probs = [], []
        running = [s for s in seqs if s.output]  # prefilled; the newly admitted prefill this round
        room = {s.request_id: min(k, s.params.max_new_tokens - len(s.output) - 1, self.max_model_len - len(s.tokens))
                for s in running}
        active = [s for s in running if room[s.request_id] > 0]
        if not active:
            return
        self.runtime.phase = "draft"
        try:
            while active:
                last = [(s.draft or s.tokens)[-1] for s in active]
                batch = self.cache.batch([s.slot for s in active], [1] * len(active))
                with torch.inference_mode():
                    logits = self.model(torch.tensor(last, device=self.cache.k.device), batch, self.cache)  # [b, V]
                drafting = [i for i, s in enumerate(active) if len(s.draft) < room[s.request_id]]
                self._take_draft_tokens([active[i] for i in drafting], logits[drafting])
                active = [active[i] for i in drafting]
        finally:
            self.runtime.end_draft()
        for seq in running:
            self.cache.truncate(seq.slot, len(seq.tokens) - 1)  # drop the scratch entries

    def _take_draft_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        probs: dict[int, torch.Tensor] = {}
        noise = [self._noise(s, len(s.tokens) + len(s.draft), logits.shape[-1]) for s in seqs]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs], probs, noise)
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            seq.draft.append(token)
            if row in probs:
                seq.draft_probs.append(probs[row])

    def _verify(self, seqs: list[Sequence]) -> torch.Tensor:
        """One exact pass: new sequences prefill, running ones check their draft. -> [B, k+1, V]"""
        fresh = [not s.output for s in seqs]
        lens = [len(s.tokens) - self.cache.lengths[s.slot] + len(s.draft) for s in seqs]
        batch = self.cache.batch([s.slot for s in seqs], lens)
        ids = [t for s, n in zip(seqs, lens) for t in (s.tokens + s.draft)[-n:]]
        # logits for every position of a draft check, for a prefill only the last; rows are
        # padded to the widest span by repeating a sequence's last row (ignored: drafts are PAD there)
        spans = [(hi - 1, hi) if new else (hi - len(s.draft) - 1, hi) for s, new, hi in zip(seqs, fresh, batch.offsets[1:])]
        width = max(hi - lo for lo, hi in spans)
        rows = [min(lo + j, hi - 1) for lo, hi in spans for j in range(width)]
        if self.runtime is not None:
            self.runtime.lookahead = self.config.decoder.mode_spec.lookahead or any(fresh)
        device = self.cache.k.device
        with torch.inference_mode():
            logits = self.model(torch.tensor(ids, device=device), batch, self.cache, torch.tensor(rows, device=device))
        return logits.view(len(seqs), width, -1)  # [B, k+1, V]

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor):
        drafts = pad_drafts([s.draft for s in seqs], logits.device)  # [B, k]
        if all(s.params.greedy for s in seqs):
            return accept_greedy(drafts, logits)
        k, vocab = drafts.shape[1], logits.shape[-1]
        q = torch.zeros(len(seqs), k, vocab)  # [B, k, V]
        for i, s in enumerate(seqs):
            if s.draft_probs:
                q[i, : len(s.draft_probs)] = torch.stack(s.draft_probs)
        noise = [torch.stack([self._noise(s, len(s.tokens) + j, vocab) for j in range(len(s.draft) + 1)])
                 if s.params.keyed else None for s in seqs]  # [k_i+1, V]: the positions verification decides
        return accept_sampled(drafts, q, logits, [s.params for s in seqs], [s.generator for s in seqs], noise)

    @staticmethod
    def _noise(seq: Sequence, position: int, vocab: int) -> torch.Tensor | None:
        """The Gumbel noise of ``position`` for a seeded sampled request (None otherwise); kept
        from the draft to verification, dropped once the position is committed."""
        if not seq.params.keyed:
            return None
        if position not in seq.noise:
            seq.noise[position] = position_noise(seq.params.seed, position, vocab)
        return seq.noise[position]

    def _roll_back(self, seqs: list[Sequence], verdict) -> list[StepOutput]:
        """Append each sequence's accepted tokens and bonus (up to a stop); truncate its KV."""
        outputs = []
        gained = verdict.tokens([s.draft for s in seqs])
        for seq, tokens, accepted in zip(seqs, gained, verdict.accepted):
            kept = []
            for token in tokens:
                kept.append(token)
                if self._append(seq, token):
                    break
            if seq.finish_reason is None:
                self.cache.truncate(seq.slot, len(seq.tokens) - 1)
            seq.noise = {m: g for m, g in seq.noise.items() if m >= len(seq.tokens)}
            seq.accepted = min(accepted, len(kept))
            outputs.append(StepOutput(seq.request_id, kept, seq.finish_reason is not None, seq.finish_reason,
                                      len(seq.draft), seq.accepted))
        if self.runtime is not None:
            self.runtime.admit_staged()
        return outputs

    def _adapt(self, k: int, seqs: list[Sequence], accepted: list[int], draft_s: float, verify_s: float,
               prefill: bool) -> None:
        """Count the round (accepted tokens as emitted: none past a stop) and let the controller
        learn from ``accepted``, the verdict's counts (how good the draft was), and from the
        round's transfers."""
        drafted = [len(s.draft) for s in seqs]
        self.counters.record(drafted, [s.accepted for s in seqs], draft_s, verify_s)
        if self.runtime is not None:
            self.runtime.counters.close_round(score=any(drafted))
            self.controller.observe(self._round_traffic(seqs, prefill))
        if any(drafted) or k == 0:
            self.controller.update(k, drafted, accepted, draft_s, verify_s)

    def _round_traffic(self, seqs: list[Sequence], prefill: bool) -> RoundTraffic:
        """The runtime's counters since the last round (counters replaced meanwhile count from 0)."""
        c = self.runtime.counters
        _, stall, fetched, missed = self._seen if self._seen[0] is c else (c, 0.0, 0, 0)
        self._seen = (c, c.stall_s, c.fetch_requests, c.misses)
        deliveries = [c.deliveries.popleft() for _ in range(len(c.deliveries))]
        positions = sum(len(s.draft) + 1 for s in seqs if s.output)
        return RoundTraffic(positions, c.fetch_requests - fetched, c.misses - missed, c.stall_s - stall, deliveries, prefill)

    # -- bookkeeping ------------------------------------------------------------------------

    def _schedule(self) -> list[Sequence]:
        budget, admitted = self.config.max_prefill_tokens, 0
        while self.waiting and self.cache.num_free():
            if admitted and len(self.waiting[0].prompt) > budget:
                break  # the rest waits for the next step; one long prompt alone may exceed the budget
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            budget -= len(seq.prompt)
            admitted += 1
            self.running.append(seq)
        self.running.sort(key=lambda s: s.slot)
        return list(self.running)

    def _append(self, seq: Sequence, token: int) -> bool:
        """Append one token; returns True when the sequence finished with it."""
        seq.output.append(token)
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self._finish(seq, "stop")
        elif len(seq.output) >= p.max_new_tokens:
            self._finish(seq, "length")
        return seq.finish_reason is not None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
        self.cache.release(seq.slot)

    # -- conveniences -----------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Run prompts to completion (batched); results in the order of ``prompts``."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        seqs = {s.request_id: s for s in self.waiting if s.request_id in ids}
        while self.has_unfinished():
            self.step()
        return [self._completion(seqs[i]) for i in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[list[int]]:
        """Yield the token ids one request gains at each step until it finishes."""
        request_id = self.add_request(prompt, params)
        while self.has_unfinished():
            for out in self.step():
                if out.request_id == request_id:
                    yield out.new_token_ids
                    if out.finished:
                        return

    def _completion(self, seq: Sequence) -> Completion:
        text = self.tokenizer.decode(seq.output, skip_special_tokens=True) if self.tokenizer else None
        return Completion(seq.request_id, seq.prompt, seq.output, seq.finish_reason, text)


def speculation_controller(dec: DecoderConfig, runtime, fetch, top_k: int) -> SpeculationController:
    """The controller of k, with what its cost model knows before the first round: the experts
    the cache cannot hold, and an emulated link's configured bandwidth and latency."""
    from specmoe.link import LinkConfig

    controller = SpeculationController(dec.k_max, None if dec.k == "auto" else dec.k, overlap=dec.migration == "eager")
    if runtime is None:
        return controller
    experts = sum(runtime.num_experts.values())
    capacity = runtime.cache.budget // max(runtime.expert_bytes, 1)
    controller.traffic = ExpertTraffic(runtime.expert_bytes, max(0, experts - capacity), len(runtime.num_experts),
                                       top_k * len(runtime.num_experts) / experts)
    link = getattr(fetch, "config", None)
    if isinstance(link, LinkConfig):
        controller.link.seconds_per_byte = 1 / (link.gbps * 1e9) if link.gbps else 0.0
        controller.link.latency_s = link.latency_s
    return controller


def load_tokenizer(model_dir: str | Path):
    path = Path(model_dir)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_token_ids(model_dir: str | Path, hf_config) -> set[int]:
    """EOS ids as ``generate`` would use them: generation_config.json first, then config.json."""
    eos = None
    if (Path(model_dir) / "generation_config.json").exists():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
