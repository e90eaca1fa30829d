"""Decode throughput of our engine against transformers ``generate``, side by side in one run.

    python bench/engine.py --model ../shared/models/shakespeare-moe-8x8 --batch-sizes 1 16 --dtypes fp32 bf16

What is measured: generated tokens per second while decoding, prefill excluded. A run
generates N = ``--new-tokens`` greedy tokens for each of B prompts of ``--prompt-len`` tokens;
the first token comes out of the prefill, the other N - 1 out of decode steps. Both sides
take a timestamp t_i when token i has been chosen for every sequence:

* ours: the benchmark drives ``Engine.step()`` itself; step 1 is the prefill, steps 2..N decode;
* transformers: a stopping criterion that only reads the clock; ``generate`` calls it once
  per generated token (after the prefill, then after every decode step).

Decode throughput = B * (N - 1) / (t_N - t_1) on both sides; the prefill time (t_1 - start)
is kept in the JSON. EOS is ignored on both sides: ``ignore_eos=True`` for ours,
``eos_token_id=[]`` for transformers (rather than ``min_new_tokens``, which would mask the
EOS logit and so could change the greedy choice).

How: per dtype both models are loaded once; per batch size both run once to warm up, then
``--repeats`` repeats alternate ours and transformers (flipping the order every repeat), so
both share the machine's noise. The table shows each side's median and the median of the
per-repeat ratios. Prompts are token ids drawn with a fixed seed from the vocabulary
(special tokens excluded); batch B takes the first B, so batch 1 has the same prompt at
every batch size. Every run's greedy tokens are compared with transformers'; in fp32 at
batch 1 they must be equal, and the report says so loudly when they are not.

``--threads`` sets torch's thread count for both sides (default: torch's own, one per core).
On a 2-core machine that other processes share, two threads that meet at every parallel op
stall whenever one of them is descheduled, and both sides slow down by large, random factors
(10x and more at a load average of 3); one thread measures the same work without that.

Writes ``<out>/engine-<model>.json`` (every raw timing, the machine, the command) and ``.md``
(``engine-<model>-threads-<n>`` with ``--threads``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, command_line, load_average, machine_info, median, repo_relative, write_results  # noqa: E402
from specmoe.config import EngineConfig  # noqa: E402
from specmoe.engine import Engine, load_tokenizer  # noqa: E402
from specmoe.loader import DTYPES, parse_dtype, read_config  # noqa: E402
from specmoe.sampling import SamplingParams  # noqa: E402


@dataclass
class BenchConfig:
    model: str = str(REPO / "models" / "shakespeare-tiny-moe")
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    prompt_len: int = 32
    new_tokens: int = 64
    repeats: int = 3
    seed: int = 0
    threads: int | None = None  # torch threads for both sides; None: torch's default
    out: str = str(REPO / "bench" / "results")

    def __post_init__(self):
        for dtype in self.dtypes:
            parse_dtype(dtype)
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (one prefill token, then decode), got {self.new_tokens}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def as_report(self) -> dict:
        return {**asdict(self), "model": repo_relative(self.model), "out": repo_relative(self.out)}


@dataclass
class Run:
    """One timed generation of a batch."""

    prefill_s: float
    step_s: list[float]  # [N - 1] each decode step's duration
    tokens: list[list[int]]  # [B, N]

    @classmethod
    def from_stamps(cls, started: float, stamps: list[float], tokens: list[list[int]]) -> Run:
        """``stamps[i]``: when token i + 1 had been chosen for every sequence."""
        return cls(stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])], tokens)

    @property
    def batch(self) -> int:
        return len(self.tokens)

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * len(self.step_s) / self.decode_s

    def timings(self) -> dict:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "decode_tokens": self.batch * len(self.step_s),
                "decode_tokens_per_s": self.decode_tokens_per_s, "step_s": self.step_s}


class Ours:
    name = "ours"

    def __init__(self, cfg: BenchConfig, dtype: str):
        self.engine = Engine(EngineConfig(model=cfg.model, dtype=dtype, max_batch_size=max(cfg.batch_sizes)))
        self.params = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)

    def run(self, prompts: list[list[int]]) -> Run:
        started = time.perf_counter()
        ids = [self.engine.add_request(p, self.params) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        stamps = []
        while self.engine.has_unfinished():
            for out in self.engine.step():
                tokens[out.request_id] += out.new_token_ids
            stamps.append(time.perf_counter())
        if len(stamps) != self.params.max_new_tokens:  # e.g. the prompts exceeded one step's prefill budget
            raise RuntimeError(f"{len(stamps)} steps for {self.params.max_new_tokens} tokens: not every prompt prefilled in step 1")
        return Run.from_stamps(started, stamps, [tokens[i] for i in ids])


class StepClock:
    """A stopping criterion that never stops: it records when each token was chosen."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # [B]


class Transformers:
    name = "transformers"

    def __init__(self, cfg: BenchConfig, dtype: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=parse_dtype(dtype)).eval()
        self.new_tokens = cfg.new_tokens
        pad = self.model.generation_config.pad_token_id
        self.pad_token_id = 0 if pad is None else pad

    def settings(self) -> dict:
        return {"experts_implementation": self.model.get_experts_implementation(),
                "attn_implementation": self.model.config._attn_implementation}

    def run(self, prompts: list[list[int]]) -> Run:
        from transformers import StoppingCriteriaList

        clock = StepClock()
        started = time.perf_counter()
        ids = torch.tensor(prompts)  # [B, P]: equal lengths, so no padding
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new_tokens, do_sample=False,
                pad_token_id=self.pad_token_id, eos_token_id=[], stopping_criteria=StoppingCriteriaList([clock]),
            )
        if len(clock.stamps) < self.new_tokens:
            raise RuntimeError(f"generate chose {len(clock.stamps)} tokens, expected {self.new_tokens}")
        return Run.from_stamps(started, clock.stamps[: self.new_tokens], out[:, ids.shape[1] :].tolist())


def make_prompts(cfg: BenchConfig) -> list[list[int]]:
    """``max(batch_sizes)`` prompts of ordinary token ids, drawn with ``cfg.seed``."""
    hf_config, tokenizer = read_config(cfg.model), load_tokenizer(cfg.model)
    vocab = hf_config.vocab_size if tokenizer is None else min(hf_config.vocab_size, len(tokenizer))
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(hf_config, name, None)
        special |= set(ids) if isinstance(ids, (list, tuple)) else {ids}
    allowed = torch.tensor([t for t in range(vocab) if t not in special])  # [V']
    picks = torch.randint(len(allowed), (max(cfg.batch_sizes), cfg.prompt_len), generator=torch.Generator().manual_seed(cfg.seed))
    return allowed[picks].tolist()


def bench_cell(runners: list, prompts: list[list[int]], repeats: int) -> dict[str, list[Run]]:
    """A warm-up each, then ``repeats`` interleaved timed runs per runner."""
    for runner in runners:
        runner.run(prompts)
    runs = {runner.name: [] for runner in runners}
    for i in range(repeats):
        for runner in runners if i % 2 == 0 else runners[::-1]:
            runs[runner.name].append(runner.run(prompts))
    return runs


def first_mismatch(ours: list[list[int]], reference: list[list[int]]) -> dict | None:
    for seq, (a, b) in enumerate(zip(ours, reference)):
        for position, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return {"sequence": seq, "position": position, "ours": x, "transformers": y}
    return None


def median_step_s(runs: list[Run]) -> float:
    """The median decode step over all repeats: robust to bursts of load from other processes."""
    return median([t for r in runs for t in r.step_s])


def summarize(dtype: str, batch: int, runs: dict[str, list[Run]]) -> dict:
    ours, theirs = runs["ours"], runs["transformers"]
    reference = theirs[0].tokens
    return {
        "dtype": dtype,
        "batch": batch,
        "ours_tokens_per_s": median([r.decode_tokens_per_s for r in ours]),
        "transformers_tokens_per_s": median([r.decode_tokens_per_s for r in theirs]),
        "ratio": median([a.decode_tokens_per_s / b.decode_tokens_per_s for a, b in zip(ours, theirs)]),
        "step_ratio": median_step_s(theirs) / median_step_s(ours),
        "same_tokens": all(r.tokens == reference for r in ours + theirs),
        "first_mismatch": first_mismatch(ours[0].tokens, reference),
        "runs": {name: [r.timings() for r in rs] for name, rs in runs.items()},
    }


def run(cfg: BenchConfig) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    prompts = make_prompts(cfg)
    rows, settings = [], {}
    for dtype in cfg.dtypes:
        runners = [Ours(cfg, dtype), Transformers(cfg, dtype)]
        settings[dtype] = runners[1].settings()
        for batch in cfg.batch_sizes:
            load_before = load_average()
            row = summarize(dtype, batch, bench_cell(runners, prompts[:batch], cfg.repeats))
            rows.append({**row, "load_average": [load_before, load_average()]})
            print(f"[bench] {dtype} B={batch:<3} ours {row['ours_tokens_per_s']:8.1f} tok/s  transformers "
                  f"{row['transformers_tokens_per_s']:8.1f} tok/s  ratio {row['ratio']:.2f}x", file=sys.stderr)
    return {"config": cfg.as_report(), "machine": machine_info(), "command": command_line(),
            "transformers_settings": settings, "rows": rows}


def warnings(report: dict) -> list[str]:
    lines = []
    for row in report["rows"]:
        if row["dtype"] == "fp32" and row["batch"] == 1 and not row["same_tokens"]:
            lines.append(f"**WARNING: fp32 greedy tokens differ from transformers at batch 1**: {row['first_mismatch']}")
    return lines


def load(row: dict) -> str:
    before, after = row["load_average"]
    return "" if before is None else f"{before:.1f} -> {after:.1f}"


def markdown(report: dict) -> str:
    cfg, m = report["config"], report["machine"]
    impl = "; ".join(f"{d}: experts `{s['experts_implementation']}`, attention `{s['attn_implementation']}`"
                     for d, s in report["transformers_settings"].items())
    lines = [
        f"# Decode throughput, ours vs transformers `generate`: {Path(cfg['model']).name}", "",
        f"Command (from the repository root): `{report['command']}`", "",
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, transformers {m['transformers']}, "
        f"{m['date']}.", "",
        f"Decode only (prefill excluded): B prompts of {cfg['prompt_len']} tokens, {cfg['new_tokens']} greedy tokens each "
        f"(EOS ignored), tokens/s = B x {cfg['new_tokens'] - 1} / time from the first token to the last. "
        f"Median of {cfg['repeats']} repeats after a warm-up, ours and transformers interleaved; the ratio is the median "
        f"of the per-repeat ratios. The last column compares median decode step times over all repeats instead, "
        f"which bursts of load from other processes move less; the load average (1 min, before -> after each row) "
        f"counts this benchmark's own {m['torch_threads']} threads too. transformers ran with {impl}. "
        f"Greedy tokens: bf16 may differ (rounding order), fp32 should not.", "",
        "| dtype | batch | ours tok/s | transformers tok/s | ours / transformers | same greedy tokens | ratio of median step | load average |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['ours_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {'yes' if r['same_tokens'] else 'no'} | {r['step_ratio']:.2f}x | {load(r)} |")
    return "\n".join(lines + [""] + warnings(report)).rstrip() + "\n"


def parse_args(argv=None) -> BenchConfig:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model, help="a local Hugging Face model directory")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=defaults.batch_sizes)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=defaults.dtypes)
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the prompts' token ids")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default: one per core)")
    parser.add_argument("--out", default=defaults.out, help="folder for engine-<model>.json and .md")
    return BenchConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    report = run(cfg)
    text = markdown(report)
    threads = "" if cfg.threads is None else f"-threads-{cfg.threads}"
    write_results(Path(cfg.out) / f"engine-{Path(cfg.model).resolve().name}{threads}", report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
