"""The service under load: 1, 8 and 32 concurrent clients through the client API, specmoe against ondemand.

A local multi-node cluster (head, one store node, one decoder node); for each mode one
deployment (``build_deployment`` through ``connect()``): an ExpertStore, a Decoder actor,
the Coordinator. Each client is a thread that streams ``--requests`` prompts one after
another (closed loop) and times what a user sees: time to first token (submit to the first
piece with a token), time per output token (first token to the last, per later token),
and the run's throughput (generated tokens over wall time). Prompts are windows of the
validation part of the corpus; every request generates ``--new-tokens`` greedy tokens (EOS
ignored), and each mode's tokens are checked against ondemand's.

    python bench/service.py --clients 1 8 32 --requests 2 --new-tokens 32

Writes ``bench/results/service-<model>.json``, ``.md`` and ``-latency.png``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import command_line, load_average, machine_info, repo_relative, write_results  # noqa: E402
from bench.modes import validation_prompts  # noqa: E402

MODES = ("ondemand", "specmoe")


@dataclass
class ServiceBenchConfig:
    model: str = str(REPO / "models" / "shakespeare-tiny-moe")
    clients: list[int] = field(default_factory=lambda: [1, 8, 32])
    requests: int = 2  # per client, one after another
    prompt_len: int = 32
    new_tokens: int = 32
    transport: str = "ray"
    link_r: float | None = None  # None: the raw link; else an emulated link at this R (specmoe.link)
    out: str = str(REPO / "bench" / "results")


def spec_for(cfg: ServiceBenchConfig, mode: str, link=None):
    from cluster.deployment import CoordinatorSpec, DecodersSpec, DeploymentSpec, ModelSpec, TransportSpec
    from specmoe.config import DecoderConfig

    batch = max(cfg.clients)
    return DeploymentSpec(
        name=f"bench-{mode}",
        model=ModelSpec(path=cfg.model),
        transport=TransportSpec(kind=cfg.transport, link=link),
        decoders=DecodersSpec(count=1, max_batch_size=batch, config=DecoderConfig(mode=mode)),
        coordinator=CoordinatorSpec(max_batch_per_decoder=batch),
    )


def timed_stream(client, prompt, params) -> dict:
    started = time.perf_counter()
    first, tokens, metrics = None, [], {}
    for piece in client.stream(prompt, params):
        if piece.token_ids and first is None:
            first = time.perf_counter()
        tokens += piece.token_ids
        metrics = piece.metrics or metrics
    end = time.perf_counter()
    n = len(tokens)
    return {"tokens": tokens, "ttft_s": first - started, "tpot_s": (end - first) / (n - 1) if n > 1 else None,
            "drafted": metrics.get("drafted", 0), "accepted": metrics.get("accepted", 0), "rounds": metrics.get("rounds", 0)}


def run_level(client, prompts, clients: int, requests: int, params) -> tuple[dict, dict]:
    """``clients`` threads, each streaming ``requests`` prompts in turn; per-request records by prompt index."""
    records: dict[int, dict] = {}
    errors = []

    def one_client(c: int):
        try:
            for r in range(requests):
                i = (c * requests + r) % len(prompts)
                records[c * requests + r] = {"prompt": i, **timed_stream(client, prompts[i], params)}
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return records, summarize(list(records.values()), wall, clients)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize(records: list[dict], wall: float, clients: int) -> dict:
    ttft = [r["ttft_s"] for r in records]
    tpot = [r["tpot_s"] for r in records if r["tpot_s"] is not None]
    n = sum(len(r["tokens"]) for r in records)
    drafted = sum(r["drafted"] for r in records)
    return {
        "clients": clients,
        "requests": len(records),
        "generated_tokens": n,
        "wall_s": wall,
        "tokens_per_s": n / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "tpot_p50_ms": 1e3 * percentile(tpot, 0.5),
        "tpot_p99_ms": 1e3 * percentile(tpot, 0.99),
        "acceptance_rate": sum(r["accepted"] for r in records) / drafted if drafted else 0.0,
        "tokens_per_round": n / max(1, sum(r["rounds"] for r in records)),
    }


def run(cfg: ServiceBenchConfig) -> dict:
    from cluster.local import ClusterSpec, LocalCluster
    from deploy.client import GenerationParams, connect
    from specmoe.engine import load_tokenizer

    prompts = validation_prompts(load_tokenizer(cfg.model), max(cfg.clients) * cfg.requests, cfg.prompt_len)
    params = GenerationParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)
    rows, tokens, link = [], {}, None
    if cfg.link_r is not None:
        from specmoe.link import LinkConfig, link_for_r

        calibration = link_for_r(cfg.model, cfg.link_r)
        link = LinkConfig(gbps=calibration.gbps)
        print(f"[bench] emulated link at R={cfg.link_r:g}: resident step {1000 * calibration.step_s:.2f} ms, "
              f"{calibration.active_bytes} active expert bytes per token -> {calibration.gbps:.4g} GB/s", file=sys.stderr)
    with LocalCluster(ClusterSpec(stores=1, decoders=1)):
        for mode in MODES:
            client = connect(spec=spec_for(cfg, mode, link))  # joins this cluster, builds the deployment
            try:
                client.generate([prompts[0]], GenerationParams(max_new_tokens=4, ignore_eos=True))  # warm up
                for clients in cfg.clients:
                    records, row = run_level(client, prompts, clients, cfg.requests, params)
                    tokens[(mode, clients)] = {r["prompt"]: r["tokens"] for r in records.values()}
                    rows.append({"mode": mode, "load_average": load_average(), **row})
                    print(f"[bench] {mode:<9} clients={clients:<3} {row['tokens_per_s']:7.1f} tok/s  "
                          f"ttft p50 {row['ttft_p50_ms']:.0f} ms  tpot p50 {row['tpot_p50_ms']:.1f} ms", file=sys.stderr)
            finally:
                client.deployment.shutdown()
    for row in rows:  # greedy: every mode's tokens equal ondemand's for the same prompt
        ours, base = tokens[(row["mode"], row["clients"])], tokens[("ondemand", row["clients"])]
        row["exact"] = all(ours[i] == base[i] for i in ours)
    config = {**asdict(cfg), "model": repo_relative(cfg.model), "out": repo_relative(cfg.out),
              "link_gbps": link.gbps if link else None}
    return {"config": config, "machine": machine_info(), "command": command_line(), "rows": rows}


def ratio(rows, clients: int, key: str) -> float:
    pick = {r["mode"]: r[key] for r in rows if r["clients"] == clients}
    return pick["specmoe"] / pick["ondemand"] if pick.get("ondemand") else float("nan")


def markdown(report: dict) -> str:
    cfg, m, rows = report["config"], report["machine"], report["rows"]
    cols = ["tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "acceptance_rate", "tokens_per_round"]
    lines = [f"# The service under load: {Path(cfg['model']).name}", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, {m['date']}. A local multi-node Ray "
             f"cluster (one store node, one decoder node, experts over `{cfg['transport']}`"
             + (f", behind an emulated link at R = {cfg['link_r']:g}: {cfg['link_gbps']:.4g} GB/s, one FIFO per decoder"
                if cfg.get("link_r") is not None else ", this machine's raw loopback link")
             + "); each client streams "
             f"{cfg['requests']} requests in turn through `specmoe.connect()`, {cfg['new_tokens']} greedy tokens per "
             f"prompt of {cfg['prompt_len']} tokens. Times are what a client sees (submit to first token; first to last "
             "token per later token). One run per level on a shared machine (its load average at each level is in the JSON).", "",
             "| mode | clients | exact | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        cells = [f"{r[c]:.3g}" for c in cols]
        lines.append(f"| {r['mode']} | {r['clients']} | {'yes' if r['exact'] else 'NO'} | " + " | ".join(cells) + " |")
    lines += ["", "| clients | throughput specmoe / ondemand | ttft p50 specmoe / ondemand | tpot p50 specmoe / ondemand |",
              "|---|---|---|---|"]
    for clients in cfg["clients"]:
        lines.append(f"| {clients} | {ratio(rows, clients, 'tokens_per_s'):.2f}x | {ratio(rows, clients, 'ttft_p50_ms'):.2f} | "
                     f"{ratio(rows, clients, 'tpot_p50_ms'):.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = (("tokens_per_s", "generated tokens / s"), ("ttft_p50_ms", "time to first token (ms)"),
              ("tpot_p50_ms", "time per output token (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels):
        for j, mode in enumerate(MODES):
            pts = [(r["clients"], r[key]) for r in rows if r["mode"] == mode]
            ax.plot(*zip(*pts), marker="o", color=f"C{j}", label=mode)
            if key != "tokens_per_s":
                p99 = [(r["clients"], r[key.replace("p50", "p99")]) for r in rows if r["mode"] == mode]
                ax.plot(*zip(*p99), linestyle="--", color=f"C{j}", alpha=0.5, label=f"{mode} p99")
        ax.set(xscale="log", xlabel="concurrent clients", ylabel=label)
        ax.set_xticks(report["config"]["clients"], [str(c) for c in report["config"]["clients"]])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"the service through the client API ({Path(report['config']['model']).name}, experts over "
                 f"{report['config']['transport']}"
                 + (f", emulated link at R = {report['config']['link_r']:g}" if report['config'].get("link_r") is not None else "")
                 + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=ServiceBenchConfig.model)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--transport", choices=["ray", "grpc"], default="ray")
    parser.add_argument("--link-r", type=float, default=None,
                        help="put the experts behind an emulated link at this R (default: the raw link)")
    parser.add_argument("--out", default=ServiceBenchConfig.out)
    cfg = ServiceBenchConfig(**vars(parser.parse_args(argv)))
    if min(cfg.clients) < 1 or cfg.requests < 1 or cfg.new_tokens < 2:
        raise SystemExit("need --clients >= 1, --requests >= 1 and --new-tokens >= 2")
    report = run(cfg)
    stem = Path(cfg.out) / (f"service-{Path(cfg.model).name}" + (f"-r{cfg.link_r:g}" if cfg.link_r is not None else ""))
    write_results(stem, report, markdown(report))
    plot(report, f"{stem}-latency.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
