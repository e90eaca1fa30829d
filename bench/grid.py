"""Resumable grids of benchmark points, shared by bench/sweep.py and bench/paper.py.

A point is (transport, R, batch, mode) on one model; R ``None`` is the raw link. Every point
runs through ``bench.modes.run_mode`` on the same validation prompts, its greedy tokens are
checked against resident's at that batch (the ``exact`` column), and its row is appended to
the model's JSON the moment it finishes: a rerun with the same settings skips the points
already there, so a long grid can be split over several runs (or survive an interruption).

Experts come from one local cluster per transport (``cluster.sources.remote_experts``);
each R puts that source behind its own emulated link (``specmoe.link``), whose bandwidth
comes from one calibration per model (the resident step at batch 1 and one token's active
expert bytes), measured once and kept in the JSON so that every part of a split run uses
the same link.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import command_line, machine_info, repo_relative  # noqa: E402

RAW = None  # R of the raw link (no emulation)


def r_label(r: float | None) -> str:
    return "raw" if r is None else f"{r:g}"


def link_title(r: float | None) -> str:
    """What a figure says about its link."""
    return "raw link" if r is None else f"emulated link at R = {r:g}"


def parse_r(text: str) -> float | None:
    """``--r`` values: ``raw`` (no emulated link) or a number > 0."""
    if text == "raw":
        return RAW
    try:
        r = float(text)
    except ValueError:
        r = math.nan
    if not (math.isfinite(r) and r > 0):
        raise argparse.ArgumentTypeError(f"R must be 'raw' or a finite number > 0, got {text!r}")
    return r


@dataclass(frozen=True)
class Point:
    transport: str
    r: float | None
    batch: int
    mode: str  # a name in the script's mode table

    @property
    def key(self) -> str:
        return f"{self.transport}/{r_label(self.r)}/{self.batch}/{self.mode}"


@dataclass(frozen=True)
class GridSettings:
    """What every row of one results file shares; a resumed run must agree on all of it."""

    model: str  # as given; stored repository-relative
    prompt_len: int = 32
    new_tokens: int = 16
    cache_budget: float = 0.25
    dtype: str = "fp32"
    repeats: int = 1  # runs per point, the fastest kept
    link_latency_us: float = 0.0

    def stored(self) -> dict:
        return asdict(self) | {"model": repo_relative(self.model)}


def point_of(row: dict) -> Point:
    return Point(row["transport"], row["r"], row["batch"], row["mode"])


class Results:
    """One model's results file: settings, calibration, resident reference tokens, rows."""

    def __init__(self, path: Path, settings: GridSettings):
        self.path, self.settings = Path(path), settings
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            old = self.data["settings"]
            differ = {k: (old.get(k), v) for k, v in settings.stored().items() if old.get(k) != v}
            if differ:
                said = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                raise ValueError(f"{self.path.name} holds rows made with other settings ({said}); "
                                 "rerun with the same settings to resume, or give another --out")
        else:
            self.data = {"settings": settings.stored(), "calibration": None, "reference": {}, "rows": [], "commands": []}
        self.data["commands"].append(command_line())
        self.data["machine"] = machine_info()

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    def done(self, point: Point) -> bool:
        return any(point_of(r) == point for r in self.rows)

    def prompts(self, cut, needed: int) -> list[list[int]]:
        """The prompts of every row in this file: ``cut(count)`` once, for the first run's largest
        batch, then stored and reused, so that a resumed run with smaller batches gives its
        rows the same prompts as the reference it is checked against (windows cut for another
        count would be other text). A file from before prompts were stored is cut again for
        the largest batch it holds a reference for."""
        stored = self.data.get("prompts")
        if stored is None:
            stored = self.data["prompts"] = cut(max([needed, *map(int, self.data["reference"])]))
        if len(stored) < needed:
            raise ValueError(f"{self.path.name} holds prompts for batches up to {len(stored)}, not {needed}; "
                             "give another --out for larger batches")
        return stored

    def reference(self, batch: int) -> list[list[int]] | None:
        return self.data["reference"].get(str(batch))

    def add(self, row: dict, reference: list[list[int]] | None = None) -> None:
        self.rows.append(row)
        if reference is not None:
            self.data["reference"][str(row["batch"])] = reference
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)  # a run killed mid-write leaves the previous file whole


@dataclass(frozen=True)
class ModelCalibration:
    """The link's calibration for one model; ``at(r)`` is ``specmoe.link.Calibration``."""

    step_s: float  # one resident decode step at batch 1
    active_bytes: int  # one token's active expert bytes
    total_expert_bytes: int  # every expert of every layer

    def at(self, r: float):
        from specmoe.link import Calibration

        return Calibration(r, self.step_s, self.active_bytes)

    def link_s(self, nbytes: float, r: float | None) -> float:
        """Seconds the link at R needs for ``nbytes`` (0 on the raw link)."""
        return 0.0 if r is None else nbytes / (self.at(r).gbps * 1e9)


def calibrate(results: Results) -> ModelCalibration:
    """The model's calibration, measured once per results file (a split run reuses it)."""
    from specmoe.link import link_for_r
    from specmoe.loader import read_config

    if results.data["calibration"] is None:
        model = results.settings.model
        # the fastest of three: a busy machine only ever slows a step, and a slow step would set a slow link
        c = min((link_for_r(model, 1.0, results.settings.dtype) for _ in range(3)), key=lambda c: c.step_s)
        config = read_config(model)
        experts = getattr(config, "num_local_experts", None) or config.num_experts
        total = c.active_bytes * experts // config.num_experts_per_tok
        results.data["calibration"] = {"step_s": c.step_s, "active_bytes": c.active_bytes, "total_expert_bytes": total}
        print(f"[grid] {Path(model).name}: resident step {1000 * c.step_s:.2f} ms at batch 1 (best of 3), "
              f"{c.active_bytes:,} active expert bytes per token", file=sys.stderr)
        results.save()
    return ModelCalibration(**results.data["calibration"])


class Lent:
    """A source lent to one emulated link: everything but ``close`` (the grid closes it once)."""

    def __init__(self, source):
        self._source = source

    def __getattr__(self, name: str):
        if name == "close":
            raise AttributeError(name)
        return getattr(self._source, name)


DecoderFor = Callable[[Point, list], dict]  # (point, its prompts) -> DecoderConfig fields (the grid adds budget, profile)


def run_or_plan(results: Results, points: list[Point], decoder_for: DecoderFor, stem: Path, markdown, plots,
                plan: bool) -> float:
    """Run the points not yet in ``results``, then write ``stem``.md (``markdown(data)``) and the
    plots (``plots(data, stem)``); with ``plan``, only print the points left and return their
    estimated seconds (0 after a run)."""
    if plan:
        results.data["commands"].pop()  # a plan runs nothing: not one of the commands that made the rows
        lines, total = plan_lines(points, results.settings, calibrate(results), results.rows, decoder_for)
        print(f"{stem.name}: {len(lines)} points left, about {total / 60:.1f} min", *lines, sep="\n")
        return total
    run_grid(results, points, decoder_for)
    Path(f"{stem}.md").write_text(markdown(results.data))
    plots(results.data, str(stem))
    print(markdown(results.data))
    return 0.0


def run_grid(results: Results, points: list[Point], decoder_for: DecoderFor) -> None:
    """Run every point of ``points`` not yet in ``results``, appending each row as it finishes."""
    from bench.modes import BenchConfig, link_at, make_profile, run_mode, validation_prompts
    from cluster.sources import remote_experts
    from specmoe.config import DecoderConfig
    from specmoe.engine import load_tokenizer
    from specmoe.link import EmulatedLink

    s = results.settings
    todo = [p for p in points if not results.done(p)]
    print(f"[grid] {Path(s.model).name}: {len(points) - len(todo)} of {len(points)} points already in {results.path.name}",
          file=sys.stderr)
    if not todo:
        return
    cfg = BenchConfig(model=s.model, prompt_len=s.prompt_len, new_tokens=s.new_tokens, cache_budget=s.cache_budget,
                      dtype=s.dtype, repeats=s.repeats)
    cal = calibrate(results)
    tokenizer = load_tokenizer(s.model)
    prompts_all = results.prompts(lambda count: validation_prompts(tokenizer, count, s.prompt_len), max(p.batch for p in todo))
    for batch in sorted({p.batch for p in todo}):
        if results.reference(batch) is None:
            tokens, metrics = run_mode(cfg, DecoderConfig(mode="resident"), prompts_all[:batch], None)
            results.add({"transport": "none", "r": None, "batch": batch, "mode": "resident", "exact": True, **metrics},
                        reference=tokens)
    profile = make_profile(s.model, s.dtype, results.path.parent / f"profile-{Path(s.model).name}.json")
    for transport in dict.fromkeys(p.transport for p in todo):
        with remote_experts(s.model, transport) as source:
            for r in dict.fromkeys(p.r for p in todo if p.transport == transport):
                link = source if r is None else EmulatedLink(Lent(source), link_at(cal.at(r), s.link_latency_us)[0])
                try:
                    for p in sorted((p for p in todo if (p.transport, p.r) == (transport, r)), key=lambda p: p.batch):
                        run_point(results, p, cfg, decoder_for(p, prompts_all[: p.batch]), profile, prompts_all, link)
                finally:
                    if link is not source:
                        link.close()


def run_point(results: Results, p: Point, cfg, fields: dict, profile: Path, prompts_all: list, link) -> None:
    from bench.modes import run_mode
    from specmoe.config import DecoderConfig

    decoder = DecoderConfig(**{**fields, "cache_budget": cfg.cache_budget, "profile": profile})
    if decoder.mode_spec.remote and getattr(link, "compute", None) is None:
        print(f"[grid] {p.key}: skipped, the {p.transport} source cannot compute on its store", file=sys.stderr)
        return
    prompts = prompts_all[: p.batch]
    started = time.perf_counter()
    # best of the repeats: the machine is shared, and noise only ever slows a run down
    runs = [run_mode(cfg, decoder, prompts, link) for _ in range(cfg.repeats)]
    tokens, metrics = max(runs, key=lambda r: r[1]["tokens_per_s"])
    exact = tokens == results.reference(p.batch)
    results.add({**asdict(p), "exact": exact, "elapsed_s": time.perf_counter() - started, **metrics})
    print(f"[grid] {p.key:<34} {metrics['tokens_per_s']:8.1f} tok/s  exact={'yes' if exact else 'NO'}  "
          f"({time.perf_counter() - started:.1f} s)", file=sys.stderr)


# -- planning: how long a grid will take --------------------------------------------------------


def estimate_s(p: Point, s: GridSettings, cal: ModelCalibration, rows: list[dict], decoder: dict | None = None) -> float:
    """A rough wall time for one point (each repeat builds an engine, warms it up, runs).

    Link bytes: setting up (the pinned half of the cache; every expert once more for the
    shadow and hot draft policies, which read them all), the warm-up (one prompt's prefill
    and two tokens), and the run: bytes per token from a row of the same (batch, mode) at any
    R when there is one, else a bound (each step moves what the cache does not hold, at most
    0.6 of B tokens' active experts; half that when speculating) plus the prefill. Compute:
    the resident step, growing with B. The run takes the larger of the two."""
    a, total = cal.active_bytes, cal.total_expert_bytes
    uncached = (1 - s.cache_budget) * total
    tokens, steps = p.batch * s.new_tokens, s.new_tokens + 1
    reads_all = (decoder or {}).get("mode") == "specmoe" and decoder.get("draft_policy", "shadow") in ("shadow", "hot")
    startup = 0.5 * s.cache_budget * total + (total if reads_all else 0)
    warm = min(s.prompt_len * a, uncached) + a
    known = [r["expert_bytes_per_token"] for r in rows if (r["batch"], r["mode"]) == (p.batch, p.mode)
             and "expert_bytes_per_token" in r]
    if known:
        run = max(known) * tokens
    else:
        per_step = min(0.6 * p.batch * a, uncached) * (0.5 if "specmoe" in p.mode else 1.0)
        run = per_step * s.new_tokens + min(p.batch * s.prompt_len * a, uncached)
    compute = steps * cal.step_s * (1 + p.batch / 10)
    one = cal.link_s(startup + warm, p.r) + max(compute, cal.link_s(run, p.r)) + 1.0  # + building the engine
    return s.repeats * one


def plan_lines(points: list[Point], s: GridSettings, cal: ModelCalibration | None, rows: list[dict],
               decoder_for: DecoderFor | None = None) -> tuple[list[str], float]:
    """One line per point not yet done, with its estimate, and the total (seconds)."""
    lines, total = [], 0.0
    done = {point_of(r) for r in rows}
    for p in points:
        if p in done:
            continue
        est = estimate_s(p, s, cal, rows, decoder_for(p, []) if decoder_for else None) if cal else math.nan
        total += est
        lines.append(f"  {p.key:<40} ~{est:6.1f} s")
    return lines, total


# -- reports ----------------------------------------------------------------------------------


def pick(rows: list[dict], transport: str, r: float | None, batch: int, mode: str) -> dict | None:
    """The row of a point; resident's row (one per batch, no transport) for mode 'resident'."""
    if mode == "resident":
        transport, r = "none", None
    return next((x for x in rows if (x["transport"], x["r"], x["batch"], x["mode"]) == (transport, r, batch, mode)), None)


def best(rows: list[dict], transport: str, r: float | None, batch: int, prefix: str = "specmoe") -> dict | None:
    """The fastest row at a point among the modes whose name starts with ``prefix``."""
    found = [x for x in rows if (x["transport"], x["r"], x["batch"]) == (transport, r, batch) and x["mode"].startswith(prefix)]
    return max(found, key=lambda x: x["tokens_per_s"], default=None)


def ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> float:
    if a is None or b is None or key not in a or key not in b or not b[key]:
        return math.nan
    return a[key] / b[key]


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Target:
    """A claim with a threshold: ``value >= goal`` (or <= when ``at_most``)."""

    name: str
    value: float
    goal: float
    at_most: bool = False
    note: str = ""

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "not run"
        ok = self.value <= self.goal if self.at_most else self.value >= self.goal
        return "pass" if ok else "MISS"

    def line(self) -> str:
        goal = ("<= " if self.at_most else ">= ") + f"{self.goal:g}"
        return f"| {self.name} | {fmt(self.value)} | {goal} | {self.verdict} | {self.note} |"


def target_table(targets: list[Target]) -> list[str]:
    return ["| target | measured | goal | verdict | which rows |", "|---|---|---|---|---|", *(t.line() for t in targets)]


def header_lines(data: dict, title: str) -> list[str]:
    s, m, cal = data["settings"], data["machine"], data.get("calibration")
    lines = [f"# {title}", "", "Commands (in order; a rerun resumes):", "", *(f"    {c}" for c in data["commands"]), "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, {m['date']}. "
             f"Cache budget {s['cache_budget']:.0%} of expert bytes; {s['new_tokens']} new tokens per prompt of "
             f"{s['prompt_len']} tokens (greedy, EOS ignored); dtype {s['dtype']}; best of {s['repeats']} run(s) per point.", ""]
    if cal:
        lines += [f"Link: emulated (specmoe.link), one FIFO per decoder, {s['link_latency_us']:g} us per request; bandwidth from R: "
                  f"one token's active expert bytes ({cal['active_bytes']:,}) take R resident steps at batch 1 "
                  f"({1000 * cal['step_s']:.2f} ms measured here). 'raw': no emulation, the transport as it is.", ""]
        rs = sorted({x["r"] for x in data["rows"] if x["r"] is not None})
        c = ModelCalibration(**cal)
        lines += ["Bandwidth by R: " + ", ".join(f"R = {r:g}: {c.at(r).gbps * 1000:.4g} MB/s" for r in rs) + ".", ""] if rs else []
    lines += ["Every row's greedy tokens are compared with resident's at the same batch (exact).", ""]
    return lines


ROW_COLS = ("tokens_per_s", "expert_bytes_per_token", "mean_accepted_per_round", "acceptance_rate", "prediction_recall",
            "cache_hit_rate", "stall_s", "link_utilisation")


def point_table(rows: list[dict], transport: str, r: float | None, batches, modes) -> list[str]:
    """Every (batch, mode) row at one (transport, R), with its speed-up over ondemand."""
    out = ["| batch | mode | exact | x ondemand | " + " | ".join(ROW_COLS) + " |", "|" + "---|" * (len(ROW_COLS) + 4)]
    for batch in batches:
        ondemand = pick(rows, transport, r, batch, "ondemand")
        for mode in ("resident", *modes):
            x = pick(rows, transport, r, batch, mode)
            if x is None:
                continue
            cells = [fmt(x.get(c)) for c in ROW_COLS]
            out.append(f"| {batch} | {mode} | {'yes' if x['exact'] else 'NO'} | {fmt(ratio(x, ondemand))} | " + " | ".join(cells) + " |")
    return out


def line_plot(ax, series: dict, xlabels=None, log_y: bool = False) -> None:
    """``series``: label -> [(x, y)]; categorical x when ``xlabels`` is given."""
    for label, pts in series.items():
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), xlabels)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:panels])


def save_figure(plt, fig, path: str) -> None:
    if fig.axes[0].get_legend_handles_labels()[0]:  # bar charts carry no labels
        fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
