"""Routing skew and the distinct experts one decode step needs, measured on validation text.

    python bench/skew.py --models models/shakespeare-tiny-moe models/shakespeare-moe-64x2 \\
        ../shared/models/shakespeare-moe-8x8

The validation text is the last 5% of the Tiny Shakespeare corpus (the part none of these
models trained on). Each model's tokenizer cuts it into non-overlapping windows of
``--window`` tokens; each window is prefilled alone by the resident engine and every exact
routing decision is kept (teacher-forced: the text's tokens, not the model's).

Per layer:

- skew: the share of routed token-slots taken by the busiest 20% of the experts
  (``specmoe.profile.top_share``): 0.2 when balanced, 1.0 when one expert takes everything;
- Gini: the normalised Gini coefficient of the pick counts (``specmoe.profile.gini``);
- distinct experts at batch B: one decode step of B sequences is B tokens drawn at random
  from the validation tokens; the mean size of the union of their experts over ``--trials``
  draws, next to the same figure for uniform independent routing, E (1 - (1 - K/E)^B).

Writes ``<out>/skew-<model>.json`` and ``.md`` for each model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, command_line, machine_info, repo_relative, write_results  # noqa: E402
from specmoe.config import DecoderConfig, EngineConfig  # noqa: E402
from specmoe.engine import Engine  # noqa: E402
from specmoe.profile import distinct_experts, gini, record_routes, top_share  # noqa: E402
from specmoe.tools.train_tiny import split_corpus  # noqa: E402

SHARED = REPO.parent / "shared"


@dataclass
class SkewConfig:
    models: list[str] = field(default_factory=lambda: [str(REPO / "models" / "shakespeare-tiny-moe")])
    corpus: str = str(SHARED / "data" / "tinyshakespeare.txt")
    window: int = 128
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    trials: int = 200
    seed: int = 0
    out: str = str(REPO / "bench" / "results")

    def __post_init__(self):
        if not self.models:
            raise ValueError("give at least one model directory")
        if self.window < 1 or self.trials < 1:
            raise ValueError(f"window and trials must be >= 1, got {self.window}, {self.trials}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")


def windows(engine: Engine, text: str, size: int) -> list[list[int]]:
    ids = engine.encode(text)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def expert_bytes(hf_config, bytes_per_param: int = 2) -> int:
    """One routed expert's weights (gate, up, down) in bf16."""
    return 3 * hf_config.hidden_size * hf_config.intermediate_size * bytes_per_param


def measure(cfg: SkewConfig, model: str, text: str) -> dict:
    engine = Engine(EngineConfig(model=model, max_batch_size=1, decoder=DecoderConfig(mode="resident")))
    hf = engine.hf_config
    experts, top_k = hf.num_local_experts, hf.num_experts_per_tok
    routes = record_routes(engine, windows(engine, text, cfg.window))  # layer -> [N, K]
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = []
    for layer, indices in routes.items():
        counts = torch.bincount(indices.reshape(-1), minlength=experts).tolist()  # sync: profiling only
        distinct = {b: distinct_experts(indices, experts, b, cfg.trials, gen) for b in cfg.batch_sizes}
        layers.append({"layer": layer, "counts": counts, "skew": top_share(counts), "gini": gini(counts),
                       "unused_experts": sum(c == 0 for c in counts), "distinct": distinct})
    n = len(layers)
    return {
        "model": Path(model).name,
        "model_path": repo_relative(model),
        "layers": n,
        "experts": experts,
        "top_k": top_k,
        "hidden_size": hf.hidden_size,
        "intermediate_size": hf.intermediate_size,
        "expert_bytes_bf16": expert_bytes(hf),
        "tokens": routes[0].shape[0],
        "skew": sum(r["skew"] for r in layers) / n,
        "gini": sum(r["gini"] for r in layers) / n,
        "distinct": {b: sum(r["distinct"][b] for r in layers) / n for b in cfg.batch_sizes},
        "distinct_uniform": {b: experts * (1 - (1 - top_k / experts) ** b) for b in cfg.batch_sizes},
        "per_layer": layers,
    }


def markdown(report: dict) -> str:
    r = report["result"]
    e = r["experts"]
    lines = [
        f"# Routing skew: {r['model']}", "",
        f"Command (from the repository root): `{report['command']}`", "",
        f"{r['layers']} layers x {e} experts, top-{r['top_k']}; one expert {r['expert_bytes_bf16']:,} bytes in bf16 "
        f"(hidden {r['hidden_size']}, expert intermediate {r['intermediate_size']}). Routing of {r['tokens']:,} validation "
        f"tokens (the last 5% of the corpus, {report['config']['window']}-token windows, teacher-forced, fp32).", "",
        "Skew = share of routed token-slots taken by the busiest 20% of a layer's experts (0.2 balanced, 1.0 one "
        "expert takes all); Gini normalised to [0, 1].", "",
        "| layer | skew (top-20% share) | Gini | unused experts |",
        "|---:|---:|---:|---:|",
    ]
    for row in r["per_layer"]:
        lines.append(f"| {row['layer']} | {row['skew']:.3f} | {row['gini']:.3f} | {row['unused_experts']} |")
    lines.append(f"| mean | {r['skew']:.3f} | {r['gini']:.3f} | |")
    lines += [
        "", f"Distinct experts one decode step needs per layer (mean over layers and {report['config']['trials']} random "
        "batches of validation tokens), against uniform independent routing:", "",
        "| batch | distinct experts | share of the layer | uniform routing |",
        "|---:|---:|---:|---:|",
    ]
    for b, d in r["distinct"].items():
        lines.append(f"| {b} | {d:.1f} | {d / e:.0%} | {r['distinct_uniform'][b]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    d = SkewConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=d.models, help="model directories")
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--window", type=int, default=d.window, help="tokens per validation window")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes)
    p.add_argument("--trials", type=int, default=d.trials, help="random batches per batch size and layer")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    cfg = SkewConfig(**vars(p.parse_args(argv)))
    _, text = split_corpus(Path(cfg.corpus).read_text(encoding="utf-8"))
    for model in cfg.models:
        result = measure(cfg, model, text)
        report = {"command": command_line(None if argv is None else [sys.argv[0], *argv]),
                  "config": {**asdict(cfg), "models": [repo_relative(m) for m in cfg.models],
                             "corpus": repo_relative(cfg.corpus), "out": repo_relative(cfg.out)},
                  "machine": machine_info(), "result": result}
        write_results(Path(cfg.out) / f"skew-{result['model']}", report, markdown(report))
        print(f"[skew] {result['model']}: skew {result['skew']:.3f}, gini {result['gini']:.3f}, "
              f"distinct {({b: round(v, 1) for b, v in result['distinct'].items()})}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
