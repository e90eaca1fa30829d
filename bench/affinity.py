"""Which distance should order the hot draft policy's affinity table? Measured by draft acceptance.

Two measurements per table, on windows of the validation part of the corpus:

* teacher-forced agreement (many positions, little noise): the share of positions where the
  draft's greedy token equals the full model's, the draft being the model with every pick
  outside each layer's ``--hot-experts`` hottest experts (by the full model's use on the same
  text: a fixed hot-global set) replaced through the table at the router's weight;
* the engine's own hot policy end to end (below).

For each distance of ``specmoe.affinity`` (and two controls: every layer's table shuffled, and
the ``random`` substitution) one greedy run of the hot policy on the same prompts (windows of
the validation part of the corpus): k draft tokens per round, ``--hot-experts`` pinned per
layer, deferred migration (nothing arrives while drafting, so every pick outside the pinned
set is substituted), experts read synchronously (deterministic), and a cache that holds about the pinned experts. Reports the acceptance
(accepted / drafted tokens) and mean accepted tokens per verification, and checks every run's
tokens against the resident run's (exactness).

    python bench/affinity.py --model ../shared/models/shakespeare-moe-8x8

Writes bench/results/affinity-<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, command_line, load_average, machine_info, repo_relative, write_results  # noqa: E402
from specmoe.affinity import DEFAULT_DISTANCE, DISTANCES, AffinityTable, build_table  # noqa: E402
from specmoe.config import SHIPPED_MODEL, DecoderConfig, EngineConfig  # noqa: E402
from specmoe.engine import Engine  # noqa: E402
from specmoe.loader import load_model, read_config  # noqa: E402
from specmoe.models import model_class  # noqa: E402
from specmoe.offload import completed  # noqa: E402
from specmoe.profile import calibration_prompts  # noqa: E402
from specmoe.sampling import SamplingParams  # noqa: E402
from specmoe.weights import Checkpoint, ExpertReader  # noqa: E402

import torch  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@dataclass
class AffinityBench:
    model: Path = SHIPPED_MODEL
    prompts: int = 8
    prompt_len: int = 24
    new_tokens: int = 48
    k: int = 4
    hot_experts: int = 2
    cache_budget: float = 0.25
    batch: int = 4
    windows: int = 24  # teacher-forced: windows of the validation text
    window_len: int = 96
    sweep: str = "2,4,6"  # teacher-forced again at these pinned-expert counts


def validation_prompts(engine: Engine, count: int, length: int) -> list[list[int]]:
    text = CORPUS.read_text()
    windows = calibration_prompts(text[int(0.95 * len(text)) :], count, chars=16 * length)
    return [engine.encode(w)[:length] for w in windows]


def tables(model_dir: Path, distances: tuple[str, ...] = DISTANCES) -> dict[str, AffinityTable]:
    """One table per distance, and the default one shuffled (seeded) as a control."""
    config = read_config(model_dir)
    reader = ExpertReader(Checkpoint(model_dir), model_class(config.model_type).checkpoint_names)
    model = load_model(model_dir, "fp32", "cpu", experts=False)
    params = dict(model.named_parameters())
    counts = {layer: b.experts.num_experts for layer, b in model.moe_blocks()}
    out = {d: build_table(reader.read, counts, params, config.hidden_act, d) for d in {DEFAULT_DISTANCE, *distances}}
    rng = random.Random(0)
    shuffled = AffinityTable("shuffled", {layer: {e: rng.sample(o, len(o)) for e, o in order.items()}
                                          for layer, order in out[DEFAULT_DISTANCE].layers.items()})
    return out | {"shuffled": shuffled}


def teacher_forced(cfg: AffinityBench, tables: dict[str, AffinityTable]) -> dict[str, float]:
    """Per table (and a seeded random substitute): the share of positions whose draft token equals the model's."""
    engine = Engine(EngineConfig(model=cfg.model, max_batch_size=1))
    windows = validation_prompts(engine, cfg.windows, cfg.window_len)
    blocks = engine.model.moe_blocks()
    uses: dict[int, Counter] = {layer: Counter() for layer, _ in blocks}

    def count(router, x, logits, weights, indices):
        uses[router.layer].update(indices.reshape(-1).tolist())
        return logits, weights, indices

    reference = _argmax(engine, windows, count)
    hot = {layer: {e for e, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[: cfg.hot_experts]} for layer, c in uses.items()}
    out = {}
    for name, table in list(tables.items()) + [("random substitution", None)]:
        rng = torch.Generator().manual_seed(0)

        def substitute(router, x, logits, weights, indices, table=table, rng=rng):
            pool = sorted(hot[router.layer])
            pick = (lambda e: next(o for o in table.layers[router.layer][e] if o in hot[router.layer])) if table else \
                (lambda e: pool[int(torch.randint(len(pool), (), generator=rng))])
            subst = torch.tensor([e if e in hot[router.layer] else pick(e) for e in range(logits.shape[-1])])
            return logits, weights, subst[indices]

        draft = _argmax(engine, windows, substitute)
        out[name] = sum(int((d == r).sum()) for d, r in zip(draft, reference)) / sum(len(r) for r in reference)
    return out


def _argmax(engine: Engine, windows: list[list[int]], hook) -> list[torch.Tensor]:
    """Each window's greedy token at every position (teacher-forced), with ``hook`` on every router."""
    blocks = engine.model.moe_blocks()
    for _, block in blocks:
        block.gate.add_hook(hook)
    out = []
    try:
        for ids in windows:
            slot = engine.cache.allocate()
            batch = engine.cache.batch([slot], [len(ids)])
            with torch.inference_mode():
                logits = engine.model(torch.tensor(ids), batch, engine.cache, torch.arange(len(ids)))  # [T, V]
            engine.cache.release(slot)
            out.append(logits.argmax(-1))
    finally:
        for _, block in blocks:
            block.gate.remove_hook(hook)
    return out


def synchronous_source(model_dir: Path):
    """Experts read when requested, before ``fetch`` returns: what is resident when never depends
    on thread timing, so acceptance is the same on every run (a threaded source admits late
    arrivals a round later or earlier, which moves the hot set)."""
    config = read_config(model_dir)
    reader = ExpertReader(Checkpoint(model_dir), model_class(config.model_type).checkpoint_names)
    return lambda layer, experts: {e: completed(reader.read(layer, e)) for e in experts}


def run(cfg: AffinityBench, decoder: DecoderConfig, prompts) -> tuple[list[list[int]], dict]:
    engine = Engine(EngineConfig(model=cfg.model, max_batch_size=cfg.batch, decoder=decoder), fetch=synchronous_source(cfg.model))
    started = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True))
    c = engine.counters
    return [o.token_ids for o in outs], {
        "drafted": c.drafted_tokens, "accepted": c.accepted_tokens,
        "acceptance": c.accepted_tokens / max(1, c.drafted_tokens),
        "accepted_per_verification": c.accepted_tokens / max(1, c.verified),
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in vars(AffinityBench()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value) if not isinstance(value, Path) else Path, default=value)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    cfg = AffinityBench(**{k: v for k, v in vars(args).items() if k != "out"})
    resident = Engine(EngineConfig(model=cfg.model, max_batch_size=cfg.batch))
    prompts = validation_prompts(resident, cfg.prompts, cfg.prompt_len)
    refs = [o.token_ids for o in resident.generate(prompts, SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True))]
    base = dict(mode="specmoe", draft_policy="hot", hot_experts=cfg.hot_experts, k=cfg.k, k_max=max(cfg.k, 4),
                cache_budget=cfg.cache_budget, migration="deferred")
    rows = {}
    built = tables(cfg.model)
    agreement = teacher_forced(cfg, built)
    for name, value in agreement.items():
        print(f"{name:>10}: teacher-forced agreement {value:.3f}", file=sys.stderr)
    for name, table in built.items():
        tokens, rows[name] = run(cfg, DecoderConfig(**base, affinity=table), prompts)
        rows[name]["exact"] = tokens == refs
        print(f"{name:>10}: acceptance {rows[name]['acceptance']:.3f}", file=sys.stderr)
    tokens, rows["random substitution"] = run(cfg, DecoderConfig(**base, substitution="random"), prompts)
    rows["random substitution"]["exact"] = tokens == refs
    print(f"random substitution: acceptance {rows['random substitution']['acceptance']:.3f}", file=sys.stderr)
    sweep = [int(n) for n in cfg.sweep.split(",") if n]
    by_pinned = {n: agreement if n == cfg.hot_experts else teacher_forced(replace(cfg, hot_experts=n), built) for n in sweep}
    for name, value in agreement.items():
        rows[name]["teacher_forced_agreement"] = value
        rows[name]["teacher_forced_by_pinned"] = {n: by_pinned[n][name] for n in sweep}
    report = {"command": command_line(), "machine": machine_info(), "load_average": load_average(),
              "config": {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}, "rows": rows}
    name = Path(cfg.model).name
    md = [f"# Affinity distance against hot-policy draft acceptance: {name}", "",
          f"`{report['command']}`", "",
          f"Greedy, {cfg.prompts} validation prompts x {cfg.new_tokens} tokens (batch {cfg.batch}), k = {cfg.k}, "
          f"{cfg.hot_experts} pinned experts per layer (hot-temporal), cache budget {cfg.cache_budget}, deferred migration.", "",
          f"Teacher-forced: {cfg.windows} windows of {cfg.window_len} tokens, the {cfg.hot_experts} hottest experts "
          "per layer pinned (by the full model's use of the same text).", "",
          "| table | teacher-forced agreement | engine: acceptance | engine: accepted per verification | drafted | exact |",
          "| --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        md.append(f"| {label} | {r['teacher_forced_agreement']:.3f} | {r['acceptance']:.3f} | "
                  f"{r['accepted_per_verification']:.2f} | {r['drafted']} | {r['exact']} |")
    md += ["", "Teacher-forced agreement by pinned experts per layer (hot-global set):", "",
           "| table | " + " | ".join(f"{n} pinned" for n in sweep) + " | mean |", "| --- |" + " --- |" * (len(sweep) + 1)]
    for label, r in rows.items():
        values = [r["teacher_forced_by_pinned"][n] for n in sweep]
        md.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} |")
    write_results(args.out / f"affinity-{name}", report, "\n".join(md) + "\n")
    return 0 if all(r["exact"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
