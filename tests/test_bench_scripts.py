"""The benchmark scripts' bookkeeping on small made-up rows (no model runs): which points a grid
holds, resuming a results file, the targets' pass/miss, the paper's figures, the reports and plots."""

from __future__ import annotations

import argparse
import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))  # bench/ is scripts, not an installed package

from bench import grid, paper, sweep  # noqa: E402
from bench.grid import GridSettings, Point, Results  # noqa: E402

MACHINE = {"cpu": "test cpu", "cpu_count": 2, "torch_threads": 1, "torch": "x", "date": "today"}
CALIBRATION = {"step_s": 0.01, "active_bytes": 1_000_000, "total_expert_bytes": 4_000_000}


def row(transport, r, batch, mode, tps, **extra) -> dict:
    base = {"transport": transport, "r": r, "batch": batch, "mode": mode, "exact": True, "tokens_per_s": tps,
            "expert_bytes_per_token": 1000.0, "expert_bytes_moved": 1000.0 * batch, "mean_accepted_per_round": 0.0,
            "acceptance_rate": 0.0, "accepted_tokens": 0, "link_utilisation": 0.5}
    return base | extra


def report(rows, model="models/some-moe") -> dict:
    return {"settings": GridSettings(model=model).stored(), "machine": MACHINE, "calibration": CALIBRATION,
            "commands": ["python bench/x.py"], "rows": rows}


def sweep_rows() -> list[dict]:
    """R = 64 over Ray: specmoe 5x ondemand at B=32, 4x at 16, 1.2x at 1; raw link: k=auto 0.9x at B=4."""
    rows = []
    for batch, spec in ((1, 12.0), (16, 40.0), (32, 50.0)):
        rows += [row("none", None, batch, "resident", 100.0), row("ray", 64.0, batch, "ondemand", 10.0),
                 row("ray", 64.0, batch, "pregate", 12.0), row("ray", 64.0, batch, "history", 15.0),
                 row("ray", 64.0, batch, "specmoe-shadow-k4", spec, expert_bytes_per_token=200.0, link_utilisation=0.9),
                 row("ray", 64.0, batch, "specmoe-hot-k4", spec / 2)]
    for batch, ratio in ((1, 1.0), (4, 0.9), (16, 1.1)):
        rows += [row("ray", None, batch, "ondemand", 100.0), row("ray", None, batch, "specmoe-shadow-auto", 100.0 * ratio)]
    rows += [row("grpc", 64.0, 16, "ondemand", 8.0), row("grpc", 64.0, 16, "remote", 9.0, exact=False)]
    return rows


def test_the_sweep_targets_take_the_fastest_specmoe_row_and_say_pass_or_miss():
    got = {t.name: t for t in sweep.targets(sweep_rows())}
    want = {
        "specmoe / ondemand, B=32": (5.0, "pass"),
        "specmoe / ondemand, B=16": (4.0, "pass"),
        "specmoe / ondemand, B=1": (1.2, "MISS"),
        "specmoe / pregate, B=16": (40 / 12, "pass"),
        "specmoe / best other, B=16": (40 / 15, "pass"),  # history is the best non-specmoe row
        "bytes per token specmoe / ondemand, B=16": (0.2, "pass"),
        "link utilisation, B=16": (0.9, "pass"),
        "raw link: k=auto / ondemand, every batch (worst)": (0.9, "MISS"),
    }
    assert set(got) == set(want)
    for name, (value, verdict) in want.items():
        assert got[name].value == pytest.approx(value) and got[name].verdict == verdict, name
    assert got["specmoe / ondemand, B=16"].note == "specmoe-shadow-k4"
    assert "B=4" in got["raw link: k=auto / ondemand, every batch (worst)"].note


def test_a_target_without_rows_is_not_run_rather_than_a_miss():
    assert {t.verdict for t in sweep.targets([])} == {"not run"}


def test_the_sweep_report_leads_with_R_64_and_flags_inexact_rows(tmp_path):
    data = report(sweep_rows())
    md = sweep.markdown(data)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## R = 64, experts over Ray"
    assert "## gRPC against Ray at R = 64" in headings and "## R = raw, experts over Ray" in headings
    assert "| specmoe / ondemand, B=1 | 1.2 | >= 1.4 | MISS | specmoe-shadow-k4 |" in md
    assert "| 16 | remote | – | 9 | – | NO |" in md  # no remote row over Ray
    assert "Rows whose tokens differ from resident's: 1: grpc/R=64/B=16/remote" in md
    sweep.plots(data, str(tmp_path / "s"))
    for suffix in ("throughput-vs-batch", "throughput-vs-r", "speedup", "bytes", "utilisation"):
        assert (tmp_path / f"s-{suffix}.png").stat().st_size > 0


def test_the_sweep_grid_runs_remote_only_over_grpc_and_the_rare_modes_only_at_R_64():
    cfg = sweep.SweepConfig(r=[None, 8.0, 64.0, 256.0], batch_sizes=[1, 16])
    points = set(sweep.plan(cfg))
    assert Point("grpc", 64.0, 16, "remote") in points and not any(p.mode == "remote" and p.transport == "ray" for p in points)
    assert not any(p.transport == "grpc" and p.r != 64.0 for p in points)
    assert Point("ray", 64.0, 1, "specmoe-hot-k8") in points and Point("ray", 8.0, 1, "specmoe-hot-k8") not in points
    assert Point("ray", 64.0, 1, "specmoe-resident-k8") not in points
    assert {p.mode for p in points if p.r == 8.0} == {p.mode for p in points if p.r is None} == set(sweep.EVERY_POINT)
    assert {p.mode for p in points if p.r == 256.0} == set(sweep.LARGEST_R_MODES)
    every = set(sweep.plan(sweep.SweepConfig(r=[8.0], batch_sizes=[1], all_points=True)))
    defaults = sweep.SweepConfig().modes
    assert len(every) == (len(defaults) - 1) + len(defaults)  # ray: all but remote; grpc: all
    assert set(defaults) == set(sweep.MODES) - set(sweep.LONG_ROUNDS)  # those run when named
    assert all(m in sweep.MODES for m in (*sweep.EVERY_POINT, *sweep.GRPC_MODES, *sweep.LARGEST_R_MODES, *sweep.NOT_AT_HEADLINE))
    assert all(sweep.MODES[m].get("k_max") == 8 for m in defaults if m.startswith("specmoe"))
    assert [sweep.MODES[m]["k_max"] for m in sweep.LONG_ROUNDS] == [12, 16, 16]


def test_a_results_file_resumes_with_the_same_settings_and_refuses_others(tmp_path):
    path = tmp_path / "sweep-x.json"
    s = GridSettings(model="models/some-moe", new_tokens=16)
    first = Results(path, s)
    first.add(row("none", None, 4, "resident", 1.0), reference=[[1, 2]])
    first.add(row("ray", 64.0, 4, "ondemand", 1.0))
    again = Results(path, s)
    assert again.done(Point("ray", 64.0, 4, "ondemand")) and not again.done(Point("ray", 36.0, 4, "ondemand"))
    assert again.reference(4) == [[1, 2]] and len(again.data["commands"]) == 2
    with pytest.raises(ValueError, match=r"other settings \(new_tokens: 16 there, 8 now\).*same settings to resume"):
        Results(path, GridSettings(model="models/some-moe", new_tokens=8))


def test_a_resumed_run_with_smaller_batches_gets_the_first_runs_prompts(tmp_path):
    """Windows cut for another count are other text: a resumed run must reuse the stored prompts,
    or its rows would be checked against a reference made from other prompts."""
    cut = lambda count: [[count, i] for i in range(count)]  # noqa: E731 - like validation_prompts: depends on count
    s = GridSettings(model="models/some-moe")
    first = Results(tmp_path / "paper-x.json", s)
    assert first.prompts(cut, 256)[:16] == cut(256)[:16]
    first.add(row("none", None, 256, "resident", 1.0), reference=[[0]])
    again = Results(tmp_path / "paper-x.json", s)
    assert again.prompts(cut, 16)[:16] == cut(256)[:16] != cut(16)
    with pytest.raises(ValueError, match="prompts for batches up to 256, not 512"):
        again.prompts(cut, 512)
    older = Results(tmp_path / "sweep-y.json", s)  # a file from before prompts were stored: its largest reference
    older.data["reference"] = {"4": [[0]], "32": [[0]]}
    assert older.prompts(cut, 16) == cut(32)


def test_R_is_raw_or_a_positive_number():
    assert grid.parse_r("raw") is None and grid.parse_r("64") == 64.0
    for bad in ("0", "-3", "inf", "fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="R must be 'raw' or a finite number > 0"):
            grid.parse_r(bad)


def test_the_estimate_follows_a_measured_rows_bytes_and_the_links_bandwidth():
    s = GridSettings(model="m", new_tokens=10, repeats=1)
    cal = grid.ModelCalibration(**CALIBRATION)
    p = Point("ray", 100.0, 4, "ondemand")
    measured = [row("ray", 8.0, 4, "ondemand", 1.0, expert_bytes_per_token=50_000.0)]
    # at R = 100 the link moves the active bytes (1 MB) in 100 steps of 10 ms: 1 MB/s
    startup_and_warm = (0.5 * 0.25 * 4e6 + min(32e6, 3e6) + 1e6) / 1e6
    assert grid.estimate_s(p, s, cal, measured) == pytest.approx(startup_and_warm + 50_000 * 40 / 1e6 + 1.0)
    assert grid.estimate_s(Point("ray", None, 4, "ondemand"), s, cal, measured) < 2.0  # raw: compute only


def paper_rows(r=12.0) -> list[dict]:
    rows = []
    for batch, od, spec in ((1, 10.0, 9.0), (16, 20.0, 50.0), (256, 30.0, 150.0)):
        rows += [row("none", None, batch, "resident", 100.0),
                 row("ray", r, batch, "ondemand", od, expert_bytes_moved=1000.0 * batch),
                 row("ray", r, batch, "caching", od / 2), row("ray", r, batch, "overlap", od * 1.1),
                 row("ray", r, batch, "specmoe-hot-k4", spec, expert_bytes_moved=2000.0 * math.sqrt(batch),
                     mean_accepted_per_round=2.5, accepted_tokens=107),
                 row("ray", r, batch, "specmoe-hot-auto", spec)]
    rows += [row("ray", r, 16, "specmoe-hot-sub-random", 40.0, accepted_tokens=100, mean_accepted_per_round=2.0),
             row("ray", r, 16, "specmoe-hot-set-random", 40.0, mean_accepted_per_round=1.5),
             row("ray", r, 16, "specmoe-hot-n2", 45.0), row("ray", r, 16, "specmoe-hot-n8", 60.0)]
    return rows


def test_the_paper_figures_growth_tokens_per_step_and_substitution_gain():
    rows = paper_rows()
    assert paper.growth(rows, 12.0, "ondemand") == pytest.approx(256)
    assert paper.growth(rows, 12.0, "specmoe-hot-k4") == pytest.approx(16)
    got = {t.name: t for t in paper.targets(rows, 12.0)}
    assert got["specmoe / ondemand, B=256"].value == pytest.approx(5.0) and got["specmoe / ondemand, B=256"].verdict == "pass"
    assert got["bytes growth B=1 -> 256, specmoe"].verdict == "MISS"  # 16x > 12x
    assert got["B=1: k=auto / best baseline"].value == pytest.approx(9 / 11)  # overlap is the best baseline at B=1
    table = "\n".join(paper.paper_table(rows, 12.0, 16))
    assert "| tokens per step, hot set temporal | 7.27 | 3.5 (k = 4) |" in table
    assert "| tokens per step, hot set random | 6.81 | 2.5 (k = 4) |" in table
    assert "| accepted tokens, affinity / random substitution | +7.2% | 7% |" in table
    assert "| best number of pinned experts N (throughput) | 4 | 8 |" in table


def test_the_paper_report_and_plots(tmp_path):
    data = report(paper_rows(64.0))
    md = paper.markdown(data)
    assert md.startswith("# The paper's experiments: some-moe, R = 64")
    assert "## Expert bytes moved per run, batch 1 -> 256" in md and "| ondemand | 1e+03 | 1.6e+04 | 2.56e+05 | 256x |" in md and "specmoe-shadow-k4 |" not in md
    assert "| specmoe-hot-n8 | k=4, k_max=8, hot_experts=8 | 60 | 3 |" in md
    paper.plots(data, str(tmp_path / "p"))
    assert (tmp_path / "p-batch.png").stat().st_size > 0 and (tmp_path / "p-ablations.png").stat().st_size > 0


def test_the_paper_grid_leaves_out_a_pinned_set_as_large_as_the_layer_and_the_raw_link():
    cfg = paper.PaperConfig(batch_sizes=[1, 256], ablation_batch=16)
    points = paper.plan(cfg, 12.0, experts=8)
    modes16 = {p.mode for p in points if p.batch == 16}
    assert "specmoe-hot-n2" in modes16 and "specmoe-hot-n8" not in modes16 and "specmoe-hot-n16" not in modes16
    assert {"specmoe-hot-set-global", "specmoe-hot-sub-random", "specmoe-hot-k10"} <= modes16
    assert {p.mode for p in points if p.batch == 256} == {*paper.BASELINES, *paper.POLICIES}
    assert "specmoe-hot-n16" in {p.mode for p in paper.plan(cfg, 12.0, experts=64)}
    assert not any(p.batch == 16 for p in paper.plan(cfg, 64.0, experts=64))  # the ablations run at one R
    assert paper.MODES["specmoe-hot-k10"]["k_max"] == 10
    with pytest.raises(ValueError, match="emulated link only"):
        paper.plan(cfg, None, experts=8)
