"""The R x batch sweep: every mode at R in {raw, 8, 36, 64, 256} and batch in {1, 4, 16, 32}.

    python bench/sweep.py --models ../shared/models/shakespeare-moe-8x8 models/shakespeare-tiny-moe

Experts over Ray (and gRPC at R = 64: gRPC against Ray, and the remote mode, which needs a
store that computes), behind an emulated link whose bandwidth is set from R per model
(``specmoe.link.link_for_r``: one token's active expert bytes take R resident steps).
Every row's greedy tokens are checked against resident's. The grid is resumable: rows are
appended to ``bench/results/sweep-<model>.json`` as they finish and a rerun with the same
settings skips them; ``--models``, ``--r``, ``--batch-sizes``, ``--modes`` and
``--transports`` run a subset; ``--plan`` prints the points left and a time estimate
without running anything. Writes ``sweep-<model>.md`` (the R = 64 table first, with the
targets and pass/miss) and PNG plots.

Not every mode runs at every point (the grid would not fit a short run on two cores): see
``plan`` and the markdown's "Grid" section, or ``--all-points`` to run everything.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.grid import (  # noqa: E402
    GridSettings, Point, Results, Target, best, figure, fmt, header_lines, line_plot, link_title, parse_r, pick, point_table,
    r_label, ratio, run_or_plan, save_figure, target_table,
)
from bench.modes import LRU, budget_fraction  # noqa: E402

HEADLINE_R = 64.0
K_MAX = 8


def specmoe(policy: str, k, k_max: int = K_MAX) -> dict:
    return dict(mode="specmoe", draft_policy=policy, k=k, k_max=k_max, eviction=LRU)


MODES: dict[str, dict] = {  # name -> DecoderConfig fields (the grid adds the budget and the profile)
    "ondemand": dict(mode="ondemand", eviction=LRU),
    "pregate": dict(mode="pregate", eviction=LRU),
    "history": dict(mode="history", eviction=LRU),
    "caching": dict(mode="caching", eviction=LRU),
    "remote": dict(mode="remote", eviction=LRU),  # grpc only: the store computes
    **{f"specmoe-{policy}-{name}": specmoe(policy, k)
       for policy in ("shadow", "resident", "hot") for name, k in (("k4", 4), ("k8", 8), ("auto", "auto"))},
    # int8 shadows: twice the int4 copies' memory, a draft closer to the model (more accepted per round)
    **{f"specmoe-shadow8-{name}": {**specmoe("shadow", k), "shadow_bits": 8} for name, k in (("k8", 8), ("auto", "auto"))},
    # longer rounds (auto16 is the engine's default k_max): once a round needs nearly every expert,
    # its bytes barely grow with k
    **{f"specmoe-shadow-{name}": specmoe("shadow", k, k_max=k_max)
       for name, k, k_max in (("k12", 12, 12), ("k16", 16, 16), ("auto16", "auto", 16))},
}
BASELINES = ("ondemand", "pregate", "history", "caching", "remote")

# The grid: what runs where, so that the whole sweep fits about 35 minutes on two cores
# (bench/sweep.py --plan prints the estimate). Link time grows with R, so the largest R runs least.
EVERY_POINT = ("ondemand", "pregate", "specmoe-shadow-k4", "specmoe-shadow-auto", "specmoe-hot-auto")
LARGEST_R_MODES = ("ondemand", "specmoe-shadow-k4")
NOT_AT_HEADLINE = ("specmoe-resident-k8",)  # the resident policy's drafts are rejected most: k = 8 adds only bytes
GRPC_MODES = ("ondemand", "remote", "specmoe-shadow-k4")
LONG_ROUNDS = ("specmoe-shadow-k12", "specmoe-shadow-k16", "specmoe-shadow-auto16")  # only when named (bench/results/k-max)
GRID_NOTES = [
    f"At R = {HEADLINE_R:g} over Ray: every mode but {', '.join(NOT_AT_HEADLINE)} (the resident draft policy is "
    "rejected most; k = 8 would only move more bytes).",
    f"At the other R over Ray: {', '.join(EVERY_POINT)} (the baselines the speed-up is measured against, the shadow "
    "policy at k = 4 and adaptive k, the hot policy adaptive); at the largest R only "
    f"{', '.join(LARGEST_R_MODES)}: its link time is 4x R = 64's.",
    f"Over gRPC: R = {HEADLINE_R:g} only ({', '.join(GRPC_MODES)}): gRPC against Ray, and remote, which needs a store that computes.",
    f"{', '.join(LONG_ROUNDS)} run only where --modes names them.",
]


@dataclass
class SweepConfig:
    models: list[str] = field(default_factory=lambda: [str(REPO.parent / "shared" / "models" / "shakespeare-moe-8x8"),
                                                      str(REPO / "models" / "shakespeare-tiny-moe")])
    r: list = field(default_factory=lambda: [None, 8.0, 36.0, 64.0, 256.0])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    modes: list[str] = field(default_factory=lambda: [m for m in MODES if m not in LONG_ROUNDS])
    transports: list[str] = field(default_factory=lambda: ["ray", "grpc"])
    prompt_len: int = 32
    new_tokens: int = 12
    cache_budget: float = 0.25
    dtype: str = "fp32"
    repeats: int = 1
    link_latency_us: float = 0.0
    all_points: bool = False
    plan: bool = False
    out: str = str(REPO / "bench" / "results")


def plan(cfg: SweepConfig) -> list[Point]:
    """The points of the grid within the requested subsets."""
    points = []
    for transport in cfg.transports:
        for r in cfg.r:
            for batch in cfg.batch_sizes:
                for mode in cfg.modes:
                    if wanted(cfg.all_points, transport, r, mode):
                        points.append(Point(transport, r, batch, mode))
    return points


def wanted(all_points: bool, transport: str, r, mode: str) -> bool:
    if mode == "remote":  # only a gRPC store computes
        return transport == "grpc" and (all_points or r == HEADLINE_R)
    if all_points:
        return True
    if transport == "grpc":
        return r == HEADLINE_R and mode in GRPC_MODES
    if r == HEADLINE_R:
        return mode not in NOT_AT_HEADLINE
    if r is not None and r > HEADLINE_R:
        return mode in LARGEST_R_MODES
    return mode in EVERY_POINT


def settings(cfg: SweepConfig, model: str) -> GridSettings:
    return GridSettings(model=model, prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, cache_budget=cfg.cache_budget,
                        dtype=cfg.dtype, repeats=cfg.repeats, link_latency_us=cfg.link_latency_us)


def decoder_for(point: Point, prompts) -> dict:
    return MODES[point.mode]


# -- the report -------------------------------------------------------------------------------


def targets(rows: list[dict]) -> list[Target]:
    """The sweep's targets at R = 64 over Ray (the best specmoe row at each batch), and k = auto on the raw link."""
    r, t = HEADLINE_R, "ray"
    out = []

    def spec(batch):
        return best(rows, t, r, batch)

    def named(row):
        return row["mode"] if row else "–"

    for batch, goal in ((32, 4.3), (16, 3.5), (1, 1.4)):
        s = spec(batch)
        out.append(Target(f"specmoe / ondemand, B={batch}", ratio(s, pick(rows, t, r, batch, "ondemand")), goal, note=named(s)))
    s = spec(16)
    out.append(Target("specmoe / pregate, B=16", ratio(s, pick(rows, t, r, 16, "pregate")), 3.0, note=named(s)))
    other = max((x for x in (pick(rows, t, r, 16, m) for m in BASELINES) if x), key=lambda x: x["tokens_per_s"], default=None)
    out.append(Target("specmoe / best other, B=16", ratio(s, other), 2.0, note=f"{named(s)} / {named(other)}"))
    out.append(Target("bytes per token specmoe / ondemand, B=16",
                      ratio(s, pick(rows, t, r, 16, "ondemand"), "expert_bytes_per_token"), 0.22, at_most=True, note=named(s)))
    out.append(Target("link utilisation, B=16", s.get("link_utilisation", math.nan) if s else math.nan, 0.85, note=named(s)))
    raw = [(b, ratio(pick(rows, t, None, b, "specmoe-shadow-auto"), pick(rows, t, None, b, "ondemand")))
           for b in sorted({x["batch"] for x in rows if x["r"] is None and x["transport"] == t})]
    raw = [(b, v) for b, v in raw if not math.isnan(v)]
    worst = min(raw, key=lambda bv: bv[1], default=(None, math.nan))
    out.append(Target("raw link: k=auto / ondemand, every batch (worst)", worst[1], 0.95,
                      note=f"specmoe-shadow-auto, worst at B={worst[0]}" if raw else ""))
    return out


def markdown(data: dict) -> str:
    rows = data["rows"]
    name = Path(data["settings"]["model"]).name
    batches = sorted({x["batch"] for x in rows})
    rs = sorted({x["r"] for x in rows if x["transport"] != "none"}, key=lambda r: -1 if r is None else r)
    modes = [m for m in MODES if any(x["mode"] == m for x in rows)]
    lines = header_lines(data, f"R x batch sweep: {name}")
    lines += [f"## R = {HEADLINE_R:g}, experts over Ray", "", "Targets (specmoe: the fastest specmoe row at that batch):", "",
              *target_table(targets(rows)), "", *point_table(rows, "ray", HEADLINE_R, batches, modes), ""]
    if any(x["transport"] == "grpc" for x in rows):
        lines += [f"## gRPC against Ray at R = {HEADLINE_R:g}", "", "| batch | mode | ray tok/s | grpc tok/s | grpc / ray | grpc exact |",
                  "|---|---|---|---|---|---|"]
        for batch in batches:
            for mode in modes:
                g, y = pick(rows, "grpc", HEADLINE_R, batch, mode), pick(rows, "ray", HEADLINE_R, batch, mode)
                if g:
                    lines.append(f"| {batch} | {mode} | {fmt(y and y['tokens_per_s'])} | {fmt(g['tokens_per_s'])} | "
                                 f"{fmt(ratio(g, y))} | {'yes' if g['exact'] else 'NO'} |")
        lines += [""]
    lines += ["## Best specmoe / ondemand by R (Ray)", "", "| batch | " + " | ".join(f"R={r_label(r)}" for r in rs) + " |",
              "|" + "---|" * (len(rs) + 1)]
    for batch in batches:
        cells = []
        for r in rs:
            s = best(rows, "ray", r, batch)
            cells.append(f"{fmt(ratio(s, pick(rows, 'ray', r, batch, 'ondemand')))} ({s['mode'][8:]})" if s else "–")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += [""]
    for r in (r for r in rs if r != HEADLINE_R):
        lines += [f"## R = {r_label(r)}, experts over Ray", "", *point_table(rows, "ray", r, batches, modes), ""]
    lines += ["## Grid", "", *(f"- {n}" for n in GRID_NOTES), ""]
    inexact = [x for x in rows if not x["exact"]]
    lines += [f"Rows whose tokens differ from resident's: {len(inexact)}"
              + (": " + ", ".join(f"{x['transport']}/R={r_label(x['r'])}/B={x['batch']}/{x['mode']}" for x in inexact) if inexact else ".")]
    return "\n".join(lines) + "\n"


def plots(data: dict, stem: str) -> None:
    rows = [x for x in data["rows"] if x["transport"] in ("ray", "none")]
    batches = sorted({x["batch"] for x in rows})
    rs = sorted({x["r"] for x in rows if x["transport"] == "ray"}, key=lambda r: -1 if r is None else r)
    modes = list(dict.fromkeys(x["mode"] for x in rows))
    if not rs:
        return
    plt, fig, axes = figure(len(rs))
    for ax, r in zip(axes, rs):
        line_plot(ax, {m: [(b, x["tokens_per_s"]) for b in batches if (x := pick(rows, "ray", r, b, m))] for m in modes})
        ax.set(xscale="log", xlabel="batch size", ylabel="generated tokens / s", title=f"experts over Ray, {link_title(r)}")
    save_figure(plt, fig, f"{stem}-throughput-vs-batch.png")
    labels = [r_label(r) for r in rs]
    plt, fig, axes = figure(len(batches))
    for ax, b in zip(axes, batches):
        line_plot(ax, {m: [(i, x["tokens_per_s"]) for i, r in enumerate(rs) if (x := pick(rows, "ray", r, b, m))]
                       for m in modes}, labels, log_y=True)
        ax.set(xlabel="R (emulated link)", ylabel="generated tokens / s", title=f"batch {b}, experts over Ray, emulated link")
    save_figure(plt, fig, f"{stem}-throughput-vs-r.png")
    plt, fig, axes = figure(1)
    line_plot(axes[0], {f"B={b}": [(i, v) for i, r in enumerate(rs)
                                   if not math.isnan(v := ratio(best(rows, "ray", r, b), pick(rows, "ray", r, b, "ondemand")))]
                        for b in batches}, labels)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xlabel="R (emulated link)", ylabel="best specmoe / ondemand (tokens/s)", title="speed-up over ondemand (Ray, emulated link)")
    save_figure(plt, fig, f"{stem}-speedup.png")
    for key, label, suffix, log_y in (("expert_bytes_per_token", "expert bytes moved per token", "bytes", True),
                                      ("link_utilisation", "link utilisation", "utilisation", False)):
        plt, fig, axes = figure(1)
        line_plot(axes[0], {m: [(b, x[key]) for b in batches if (x := pick(rows, "ray", HEADLINE_R, b, m)) and key in x]
                            for m in modes}, log_y=log_y)
        axes[0].set(xscale="log", xlabel="batch size", ylabel=label, title=f"experts over Ray, {link_title(HEADLINE_R)}")
        save_figure(plt, fig, f"{stem}-{suffix}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = SweepConfig()
    parser.add_argument("--models", nargs="+", default=d.models)
    parser.add_argument("--r", type=parse_r, nargs="+", default=d.r, help="R values: 'raw' (no emulated link) or numbers")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=d.modes)
    parser.add_argument("--transports", nargs="+", choices=["ray", "grpc"], default=d.transports)
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len)
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens)
    parser.add_argument("--cache-budget", type=budget_fraction, default=d.cache_budget)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=d.dtype)
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs per point; the fastest is kept")
    parser.add_argument("--link-latency-us", type=float, default=d.link_latency_us)
    parser.add_argument("--all-points", action="store_true", help="every mode at every point (no grid rules)")
    parser.add_argument("--plan", action="store_true", help="print the points left and a time estimate; run nothing")
    parser.add_argument("--out", default=d.out)
    cfg = SweepConfig(**vars(parser.parse_args(argv)))
    points = plan(cfg)
    grand = 0.0
    for model in cfg.models:
        stem = Path(cfg.out) / f"sweep-{Path(model).name}"
        results = Results(Path(f"{stem}.json"), settings(cfg, model))
        grand += run_or_plan(results, points, decoder_for, stem, markdown, plots, cfg.plan)
    if cfg.plan:
        print(f"all models: about {grand / 60:.1f} min (rough: link time from the calibration, compute from the resident step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
