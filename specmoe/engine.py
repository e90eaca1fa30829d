"""The generation engine: continuous batching of ragged sequences over one model and KV cache.

Each ``step()`` runs one forward pass for every scheduled sequence: sequences admitted in
this step contribute their whole prompt (prefill), running ones their last token (decode),
all in the same ragged batch.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specmoe.kv_cache import KVCache
from specmoe.layers import EXPERTS_FUNCTIONS
from specmoe.loader import load_model, parse_dtype, read_config
from specmoe.sampling import SamplingParams, sample

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shakespeare-tiny-moe"


@dataclass
class EngineConfig:
    """How to run a model. Validated once, here."""

    model: str | Path = SHIPPED_MODEL
    dtype: str = "fp32"
    device: str = "cpu"
    max_batch_size: int = 16
    max_model_len: int | None = None  # default: min(max_position_embeddings, 2048)
    max_prefill_tokens: int = 4096
    experts_implementation: str = "eager"

    def __post_init__(self):
        parse_dtype(self.dtype)
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.experts_implementation not in EXPERTS_FUNCTIONS:
            raise ValueError(
                f"unknown experts implementation {self.experts_implementation!r}; registered: {sorted(EXPERTS_FUNCTIONS)}"
            )


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop" (EOS or a stop token) or "length"
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None


class Engine:
    """Generate from a model with continuous batching. No Ray here: actors wrap this class."""

    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        self.config = config
        self.hf_config = read_config(config.model) if model is None else model.config
        self.model = model if model is not None else load_model(config.model, config.dtype, config.device)
        for _, block in self.model.moe_blocks():
            block.experts.implementation = config.experts_implementation
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.eos_token_ids = eos_token_ids(config.model, self.hf_config)
        self.max_model_len = config.max_model_len or min(self.hf_config.max_position_embeddings, 2048)
        layers, kv_heads, head_dim = self.model.kv_shape()
        dtype = next(self.model.parameters()).dtype
        self.cache = KVCache(layers, config.max_batch_size, self.max_model_len, kv_heads, head_dim, dtype, config.device)
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
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"max_model_len ({self.max_model_len})"
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

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One forward pass over every scheduled sequence; returns what each one gained."""
        seqs = self._schedule()
        if not seqs:
            return []
        lens = [len(s.tokens) - self.cache.lengths[s.slot] for s in seqs]
        batch = self.cache.batch([s.slot for s in seqs], lens)
        input_ids = [t for s, n in zip(seqs, lens) for t in s.tokens[-n:]]
        input_ids = torch.tensor(input_ids, dtype=torch.long, device=self.cache.k.device)  # [N]
        with torch.inference_mode():
            logits = self.model(input_ids, batch, self.cache)  # [B, V]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return [self._append(seq, token) for seq, token in zip(seqs, tokens)]

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

    def _append(self, seq: Sequence, token: int) -> StepOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.output.append(token)
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            self._finish(seq, "stop")
        elif len(seq.output) >= p.max_new_tokens:
            self._finish(seq, "length")
        return StepOutput(seq.request_id, [token], seq.finish_reason is not None, seq.finish_reason)

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
