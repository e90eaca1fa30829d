"""What a shadow draft step costs next to a resident decode step, at the same batch.

    python bench/draft_cost.py --model ../shared/models/shakespeare-moe-8x8 --batch-sizes 1 16

A draft step is one forward pass of the model in draft routing (specmoe mode, shadow draft
policy, k fixed): an expert that is not here runs from its low-bit shadow copy. A resident
decode step is one forward pass of the resident engine over the same batch (one token per
sequence). Both are timed around ``model.forward`` only (sampling and bookkeeping excluded),
over a whole generation: the figure is the mean, so work done once per round (the first draft
step of a round) is spread over the round's steps as it is in a run. The experts sit behind an
emulated link at ``--link-r`` (R as in the README: one token's active expert bytes over the
link / one resident step at batch 1), so predicted experts are still in flight while the draft
runs and the draft uses its shadows, as it does when the link dominates.

Writes ``<out>/draft-cost-<model>.json`` and ``.md``. Greedy tokens are checked against resident.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, command_line, load_average, machine_info, repo_relative, write_results  # noqa: E402
from specmoe.config import DecoderConfig, EngineConfig  # noqa: E402
from specmoe.engine import Engine  # noqa: E402
from specmoe.link import EmulatedLink, LinkConfig, link_for_r  # noqa: E402
from specmoe.loader import read_config  # noqa: E402
from specmoe.offload import checkpoint_fetcher  # noqa: E402
from specmoe.sampling import SamplingParams  # noqa: E402


@dataclass
class BenchConfig:
    model: str = str(REPO.parent / "shared" / "models" / "shakespeare-moe-8x8")
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    dtype: str = "fp32"
    k: int = 3
    cache_budget: float = 0.25
    shadow_bits: int = 4
    prompt_len: int = 16
    new_tokens: int = 32
    link_r: float = 64.0
    repeats: int = 3
    seed: int = 0
    out: str = str(REPO / "bench" / "results")

    def __post_init__(self):
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (a draft must run), got {self.k}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.new_tokens < 2 or self.prompt_len < 1:
            raise ValueError(f"new_tokens must be >= 2 and prompt_len >= 1, got {self.new_tokens}, {self.prompt_len}")


def timed_forwards(engine: Engine, keep) -> list[tuple[float, float]]:
    """Wrap ``engine.model.forward``: (wall seconds, this thread's CPU seconds) of every call for
    which ``keep(ids)`` holds. With one torch thread the CPU time is the step's whole compute, and
    other processes on a busy machine do not inflate it as they do the wall time."""
    times: list[tuple[float, float]] = []
    forward = engine.model.forward

    def timed(ids, *args, **kwargs):
        started, cpu = time.perf_counter(), time.thread_time()
        out = forward(ids, *args, **kwargs)
        if keep(ids):
            times.append((time.perf_counter() - started, time.thread_time() - cpu))
        return out

    engine.model.forward = timed
    return times


def run(cfg: BenchConfig, batch: int, prompts: list[list[int]], link_gbps: float) -> dict:
    """Both engines built once; then ``repeats`` generations each, alternating, so both share the
    machine's noise. The ratio is the median of the per-repeat ratios of mean step times."""
    params = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)
    resident = Engine(EngineConfig(model=cfg.model, dtype=cfg.dtype, max_batch_size=batch))
    decode = timed_forwards(resident, lambda ids: len(ids) == batch)
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=cfg.k, cache_budget=cfg.cache_budget,
                            shadow_bits=cfg.shadow_bits)
    link = EmulatedLink(checkpoint_fetcher(cfg.model), LinkConfig(gbps=link_gbps))
    repeats, same = [], True
    try:
        engine = Engine(EngineConfig(model=cfg.model, dtype=cfg.dtype, max_batch_size=batch, decoder=decoder), fetch=link)
        rt = engine.runtime
        draft = timed_forwards(engine, lambda ids: rt.phase == "draft" and len(ids) == batch)
        for _ in range(cfg.repeats):
            decode.clear(), draft.clear()
            ref = [o.token_ids for o in resident.generate(prompts, params)]
            same &= [o.token_ids for o in engine.generate(prompts, params)] == ref
            link.drain()  # what this generation left on the link is not the next one's
            repeats.append({"resident_step_ms": 1000 * statistics.mean(w for w, _ in decode),
                            "draft_step_ms": 1000 * statistics.mean(w for w, _ in draft),
                            "resident_step_cpu_ms": 1000 * statistics.mean(c for _, c in decode),
                            "draft_step_cpu_ms": 1000 * statistics.mean(c for _, c in draft),
                            "resident_steps": len(decode), "draft_steps": len(draft)})
    finally:
        link.close()
    c = rt.counters
    return {
        "batch": batch,
        "resident_step_ms": statistics.median(r["resident_step_ms"] for r in repeats),
        "draft_step_ms": statistics.median(r["draft_step_ms"] for r in repeats),
        "ratio": statistics.median(r["draft_step_ms"] / r["resident_step_ms"] for r in repeats),
        "resident_step_cpu_ms": statistics.median(r["resident_step_cpu_ms"] for r in repeats),
        "draft_step_cpu_ms": statistics.median(r["draft_step_cpu_ms"] for r in repeats),
        "cpu_ratio": statistics.median(r["draft_step_cpu_ms"] / r["resident_step_cpu_ms"] for r in repeats),
        "repeats": repeats,
        "shadow_uses": c.shadow_uses,
        "shadow_bytes": rt.shadow_bytes,
        "staged_peak_bytes": c.peak_staged_bytes,
        "draft_wait_s": c.draft_wait_s,
        "draft_s": engine.counters.draft_s,
        "acceptance_rate": engine.counters.accepted_tokens / max(1, engine.counters.drafted_tokens),
        "same_greedy_tokens": same,
    }


def markdown(report: dict) -> str:
    cfg, link = report["config"], report["link"]
    lines = [
        f"# Shadow draft step vs resident decode step: {Path(cfg['model']).name}", "",
        f"Command (from the repository root): `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['torch_threads']} torch threads, "
        f"torch {report['machine']['torch']}, {report['machine']['date']}.", "",
        f"{cfg['dtype']}, k = {cfg['k']}, cache budget {cfg['cache_budget']:g} of the expert bytes, int{cfg['shadow_bits']} "
        f"shadows; experts behind an emulated link at R = {link['r']:g} ({link['gbps']:.4g} GB/s), so the draft runs on "
        f"shadows while its predicted experts are in flight. Mean forward-pass time over a generation of "
        f"{cfg['new_tokens']} tokens per sequence (the draft's one-off work per round spread over its steps); "
        f"{cfg['repeats']} repeats, resident and draft alternating; medians, and the median of per-repeat ratios. "
        "Draft waited: seconds the draft spent blocked in the source's fetch calls over the run (it never awaits a "
        "delivery). CPU: the decoding thread's CPU time per step (one torch thread: the step's whole compute; a busy "
        "machine inflates wall time, not this). Load average (1 min) before -> after each row.", "",
        "| batch | resident step ms | draft step ms | draft / resident | CPU ms: resident, draft | CPU draft / resident | shadow uses | draft waited s | acceptance | same greedy tokens | load average |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['resident_step_ms']:.2f} | {r['draft_step_ms']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['resident_step_cpu_ms']:.2f}, {r['draft_step_cpu_ms']:.2f} | {r['cpu_ratio']:.2f}x | "
                     f"{r['shadow_uses']} | {r['draft_wait_s']:.4f} | {r['acceptance_rate']:.2f} | "
                     f"{'yes' if r['same_greedy_tokens'] else 'NO'} | {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=d.model)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--cache-budget", type=float, default=d.cache_budget)
    p.add_argument("--shadow-bits", type=int, default=d.shadow_bits)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--link-r", type=float, default=d.link_r)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    args = p.parse_args(argv)
    cfg = BenchConfig(**vars(args))
    vocab = read_config(cfg.model).vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(3, vocab, (cfg.prompt_len,), generator=gen).tolist() for _ in range(max(cfg.batch_sizes))]
    calib = link_for_r(cfg.model, cfg.link_r, cfg.dtype)
    rows = []
    for batch in cfg.batch_sizes:
        load = load_average()
        rows.append({**run(cfg, batch, prompts[:batch], calib.gbps), "load_average": [load, load_average()]})
        print(f"[bench] batch {batch}: {rows[-1]}", file=sys.stderr)
    report = {
        "command": command_line([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "config": {**asdict(cfg), "model": repo_relative(cfg.model), "out": repo_relative(cfg.out)},
        "link": {"r": calib.r, "gbps": calib.gbps, "resident_step_s": calib.step_s, "active_bytes": calib.active_bytes},
        "rows": rows,
    }
    write_results(Path(cfg.out) / f"draft-cost-{Path(cfg.model).name}", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
