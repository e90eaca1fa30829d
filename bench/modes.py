"""The modes side by side: resident, ondemand, pregate and specmoe against transformers.

One process run, the same prompts (windows of the validation part of the corpus, so a
model that memorised its training text is not flattered), every mode at every batch size:

    python bench/modes.py --model ../shared/models/shakespeare-moe-8x8 --experts ray grpc

Every mode generates ``--new-tokens`` greedy tokens per prompt (EOS ignored) and is timed
end to end, prefill included, best of ``--repeats`` runs (the machine is shared); transformers ``generate`` runs the same prompts with every
expert resident. Greedy tokens of every mode are checked against ``resident``. Writes
``bench/results/modes-<model>-<transports>.json``, ``.md`` and two PNG plots (throughput vs batch;
expert bytes per token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import command_line, machine_info, repo_relative  # noqa: E402
from specmoe.config import DecoderConfig, EngineConfig, parse_budget  # noqa: E402
from specmoe.engine import Engine  # noqa: E402
from specmoe.metrics import summarize  # noqa: E402
from specmoe.profile import calibration_prompts, record_profile  # noqa: E402
from specmoe.sampling import SamplingParams  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass
class BenchConfig:
    model: str
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    experts: list[str] = field(default_factory=lambda: ["ray", "grpc"])
    prompt_len: int = 32
    new_tokens: int = 48
    cache_budget: float = 0.25
    dtype: str = "fp32"
    repeats: int = 2
    out: str = str(REPO / "bench" / "results")
    link_gbps: float | None = None  # experts behind an emulated link (specmoe.link) of this bandwidth
    link_latency_us: float | None = None
    link_r: float | None = None  # or the bandwidth set from R (measured on this machine)


LRU = "lru"  # the base rows use LRU; the *-lfu rows compare LFU (the decoder's default) against them
MODES = {
    "resident": DecoderConfig(mode="resident"),
    "ondemand": DecoderConfig(mode="ondemand", eviction=LRU),
    "pregate": DecoderConfig(mode="pregate", eviction=LRU),
    "history": DecoderConfig(mode="history", eviction=LRU),
    "remote": DecoderConfig(mode="remote", eviction=LRU),  # only where the source can compute (grpc)
    "specmoe-shadow-k4": DecoderConfig(mode="specmoe", draft_policy="shadow", k=4, eviction=LRU),
    "specmoe-shadow-auto": DecoderConfig(mode="specmoe", draft_policy="shadow", k="auto", eviction=LRU),
    "specmoe-resident-k4": DecoderConfig(mode="specmoe", draft_policy="resident", k=4, eviction=LRU),
    "specmoe-resident-auto": DecoderConfig(mode="specmoe", draft_policy="resident", k="auto", eviction=LRU),
    # the eviction policy, compared on the two modes that lean on the cache most
    "ondemand-lfu": DecoderConfig(mode="ondemand", eviction="lfu"),
    "specmoe-shadow-k4-lfu": DecoderConfig(mode="specmoe", draft_policy="shadow", k=4, eviction="lfu"),
}


def validation_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    text = CORPUS.read_text(encoding="utf-8")
    validation = text[int(0.95 * len(text)) :]
    windows = calibration_prompts(validation, count, chars=16 * length)
    prompts = [tokenizer.encode(w, add_special_tokens=False)[:length] for w in windows]
    if len(prompts) < count or any(len(p) < length for p in prompts):
        raise ValueError(f"could not cut {count} prompts of {length} tokens from the validation text")
    return prompts


def make_profile(model: str, dtype: str, out: Path) -> Path:
    """A routing profile from training-part text (never the benchmark prompts)."""
    text = CORPUS.read_text(encoding="utf-8")
    engine = Engine(EngineConfig(model=model, dtype=dtype, max_batch_size=16))
    profile = record_profile(engine, calibration_prompts(text[: int(0.9 * len(text))], 32), max_new_tokens=16)
    profile.save(out)
    return out


def run_mode(cfg: BenchConfig, decoder: DecoderConfig, prompts, fetch) -> tuple[list[list[int]], dict]:
    engine = Engine(EngineConfig(model=cfg.model, dtype=cfg.dtype, max_batch_size=len(prompts), decoder=decoder), fetch=fetch)
    params = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm up
    engine.counters = type(engine.counters)()
    if engine.runtime is not None:
        engine.runtime.counters = type(engine.runtime.counters)()
        engine.runtime.cache.stats = type(engine.runtime.cache.stats)()
        if getattr(engine.runtime, "oracle", None) is not None:  # overlap: its trace is of the timed run, not the warm-up
            engine.runtime.oracle.index, engine.runtime.oracle.mismatches = -1, 0
    if hasattr(fetch, "drain"):
        fetch.drain()  # what an earlier run left on the emulated link is not this run's
    link = getattr(fetch, "metrics", None) if decoder.mode_spec.offloaded else None
    link = link if hasattr(link, "busy_until") else None
    started = time.perf_counter()
    busy = link.busy_until(started) if link else 0.0
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - started
    metrics = summarize(engine, sum(len(o.token_ids) for o in outs), wall)
    if getattr(engine.runtime, "oracle", None) is not None:
        metrics["oracle_mismatches"] = engine.runtime.oracle.mismatches  # (pass, layer) routed otherwise than the trace
    if link is not None:  # the share of this run's wall time the emulated link was carrying bytes
        metrics["link_utilisation"] = (link.busy_until(time.perf_counter()) - busy) / wall
    return [o.token_ids for o in outs], metrics


def run_transformers(cfg: BenchConfig, prompts) -> tuple[list[list[int]], dict]:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=2, **kwargs)
        started = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, **kwargs
        )
        wall = time.perf_counter() - started
    tokens = out[:, ids.shape[1] :].tolist()
    n = sum(len(t) for t in tokens)
    return tokens, {"generated_tokens": n, "wall_s": wall, "tokens_per_s": n / wall}


def run(cfg: BenchConfig) -> dict:
    from cluster.sources import remote_experts
    from specmoe.engine import load_tokenizer

    results_dir = Path(cfg.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    profile = make_profile(cfg.model, cfg.dtype, results_dir / f"profile-{Path(cfg.model).name}.json")
    prompts_all = validation_prompts(load_tokenizer(cfg.model), max(cfg.batch_sizes), cfg.prompt_len)
    link, link_info = bench_link(cfg)
    rows = []
    for transport in cfg.experts:
        with remote_experts(cfg.model, transport, link=link) as fetch:
            for batch in cfg.batch_sizes:
                prompts = prompts_all[:batch]
                reference, metrics = max((run_transformers(cfg, prompts) for _ in range(cfg.repeats)),
                                         key=lambda r: r[1]["tokens_per_s"])
                rows.append({"transport": transport, "batch": batch, "mode": "transformers", "exact": True, **metrics})
                resident = None
                for name, decoder in MODES.items():
                    if decoder.mode_spec.remote and getattr(fetch, "compute", None) is None:
                        print(f"[bench] {transport}: no remote row, this source cannot compute", file=sys.stderr)
                        continue
                    decoder = DecoderConfig(**{**asdict(decoder), "cache_budget": cfg.cache_budget, "profile": profile})
                    # best of --repeats: the machine is shared, and noise only ever slows a run down
                    runs = [run_mode(cfg, decoder, prompts, fetch) for _ in range(cfg.repeats)]
                    tokens, metrics = max(runs, key=lambda r: r[1]["tokens_per_s"])
                    resident = tokens if name == "resident" else resident
                    row = {"transport": transport, "batch": batch, "mode": name, "exact": tokens == resident, **metrics}
                    rows.append(row)
                    print(f"[bench] {transport} B={batch:<3} {name:<22} {metrics['tokens_per_s']:8.1f} tok/s", file=sys.stderr)
    config = {**asdict(cfg), "model": repo_relative(cfg.model), "out": repo_relative(cfg.out), "link": link_info}
    return {"config": config, "machine": machine_info(), "command": command_line(), "rows": rows}


def bench_link(cfg: BenchConfig):
    """The emulated link of ``--link-gbps`` / ``--link-r`` (None: the raw link), and what was chosen."""
    from specmoe.link import LinkConfig, link_for_r

    if cfg.link_gbps is None and cfg.link_r is None and cfg.link_latency_us is None:
        return None, None
    if cfg.link_gbps is not None and cfg.link_r is not None:
        raise ValueError(f"--link-gbps {cfg.link_gbps} and --link-r {cfg.link_r} both set the bandwidth; give one")
    if cfg.link_r is not None:
        return link_at(link_for_r(cfg.model, cfg.link_r, cfg.dtype), cfg.link_latency_us or 0.0)
    info = {"gbps": cfg.link_gbps, "latency_us": cfg.link_latency_us or 0.0}
    return LinkConfig(gbps=info["gbps"], latency_us=info["latency_us"]), info


def link_at(c, latency_us: float = 0.0):
    """The emulated link of a calibration (``specmoe.link.Calibration``), and what was chosen."""
    from specmoe.link import LinkConfig

    info = {"gbps": c.gbps, "latency_us": latency_us, "r": c.r, "resident_step_s": c.step_s, "active_expert_bytes": c.active_bytes}
    print(f"[bench] link at R={c.r:g}: resident step {1000 * c.step_s:.2f} ms at batch 1, {c.active_bytes} "
          f"active expert bytes per token -> {c.gbps:.4g} GB/s", file=sys.stderr)
    return LinkConfig(gbps=c.gbps, latency_us=latency_us), info


def ratio(rows, transport, batch, a, b, key="tokens_per_s") -> float:
    pick = {r["mode"]: r for r in rows if r["transport"] == transport and r["batch"] == batch}
    return pick[a][key] / pick[b][key] if pick[b][key] else float("nan")


def markdown(report: dict) -> str:
    rows = report["rows"]
    cols = ["tokens_per_s", "expert_bytes_per_token", "fetch_requests_per_token", "mean_accepted_per_round",
            "acceptance_rate", "prediction_recall", "prediction_precision", "cache_hit_rate", "stall_s", "link_utilisation"]
    link = report["config"].get("link")
    link_line = ("Link: the raw one (no emulation)." if not link else
                 f"Link: emulated, {link['gbps']:.4g} GB/s" + (f" (R = {link['r']:g})" if "r" in link else "")
                 + f", {link['latency_us']:g} us per request, one FIFO per decoder.")
    lines = [f"# Modes side by side: {Path(report['config']['model']).name}", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['torch_threads']} threads, torch {report['machine']['torch']}, "
             f"{report['machine']['date']}. Cache budget {report['config']['cache_budget']:.0%} of expert bytes; "
             f"{report['config']['new_tokens']} new tokens per prompt of {report['config']['prompt_len']} tokens; dtype {report['config']['dtype']}.", "",
             link_line, ""]
    for transport in dict.fromkeys(r["transport"] for r in rows):
        lines += [f"## Experts over `{transport}`", "", "| batch | mode | exact | " + " | ".join(cols) + " |",
                  "|" + "---|" * (len(cols) + 3)]
        for r in (r for r in rows if r["transport"] == transport):
            cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
            lines.append(f"| {r['batch']} | {r['mode']} | {'yes' if r['exact'] else 'NO'} | " + " | ".join(cells) + " |")
        if any(r["mode"] == "ondemand-lfu" for r in rows):
            lines += ["", "| batch | ondemand: LFU / LRU tokens/s | LFU / LRU hit rate | specmoe-shadow-k4: LFU / LRU tokens/s |", "|---|---|---|---|"]
            for batch in dict.fromkeys(r["batch"] for r in rows if r["transport"] == transport):
                lines.append(
                    f"| {batch} | {ratio(rows, transport, batch, 'ondemand-lfu', 'ondemand'):.2f} | "
                    f"{ratio(rows, transport, batch, 'ondemand-lfu', 'ondemand', 'cache_hit_rate'):.2f} | "
                    f"{ratio(rows, transport, batch, 'specmoe-shadow-k4-lfu', 'specmoe-shadow-k4'):.2f} |"
                )
        lines += ["", "| batch | specmoe-shadow-k4 / ondemand | best specmoe / ondemand | best specmoe / pregate | bytes per token: shadow-k4 / ondemand |",
                  "|---|---|---|---|---|"]
        for batch in dict.fromkeys(r["batch"] for r in rows if r["transport"] == transport):
            best = max((r for r in rows if r["transport"] == transport and r["batch"] == batch and r["mode"].startswith("specmoe")),
                       key=lambda r: r["tokens_per_s"])["mode"]
            lines.append(
                f"| {batch} | {ratio(rows, transport, batch, 'specmoe-shadow-k4', 'ondemand'):.2f}x | "
                f"{ratio(rows, transport, batch, best, 'ondemand'):.2f}x ({best}) | {ratio(rows, transport, batch, best, 'pregate'):.2f}x | "
                f"{ratio(rows, transport, batch, 'specmoe-shadow-k4', 'ondemand', 'expert_bytes_per_token'):.2f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plots(report: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    for key, label, suffix in (("tokens_per_s", "generated tokens / s", "throughput"),
                               ("expert_bytes_per_token", "expert bytes moved per token", "bytes")):
        transports = list(dict.fromkeys(r["transport"] for r in rows))
        fig, axes = plt.subplots(1, len(transports), figsize=(6 * len(transports), 4), squeeze=False)
        for ax, transport in zip(axes[0], transports):
            for mode in dict.fromkeys(r["mode"] for r in rows):
                pts = [(r["batch"], r[key]) for r in rows if r["transport"] == transport and r["mode"] == mode and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=mode)
            ax.set(xscale="log", xlabel="batch size", ylabel=label, title=f"experts over {transport}")
            ax.set_xticks(report["config"]["batch_sizes"], [str(b) for b in report["config"]["batch_sizes"]])
            if key == "expert_bytes_per_token":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{stem}-{suffix}.png", dpi=110)
        plt.close(fig)


def budget_fraction(text: str) -> float:
    """``--cache-budget``: the reports state the budget as a share of the expert bytes, so only a fraction is taken."""
    try:
        budget = parse_budget(text, "the budget")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if budget.fraction is None:
        raise argparse.ArgumentTypeError(f"a fraction of the expert bytes (25% or 0.25) is needed here, got {text!r}")
    return budget.fraction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "shakespeare-tiny-moe"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--experts", nargs="+", choices=["local", "ray", "grpc"], default=["ray", "grpc"])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--cache-budget", type=budget_fraction, default=0.25,
                        help="expert cache as a fraction of the expert bytes: 25%% or 0.25")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest is reported")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--link-gbps", type=float, default=None, help="experts behind an emulated link of this bandwidth (GB/s)")
    parser.add_argument("--link-latency-us", type=float, default=None, help="the emulated link's latency per request (us)")
    parser.add_argument("--link-r", type=float, default=None,
                        help="set the emulated link's bandwidth from R (one token's active expert bytes take R resident steps)")
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    report = run(cfg)
    stem = Path(cfg.out) / f"modes-{Path(cfg.model).name}-{'-'.join(cfg.experts)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plots(report, stem)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
