"""Fetching a layer's experts: each transport next to the raw mechanism under it, in one run.

    python bench/transport.py    # experts of 256 KB .. 32 MB, 8 per layer, 9 repeats

For every expert size a synthetic bf16 checkpoint (one MoE layer of ``--experts`` experts,
gate_up [2I, H] + down [H, I]) is split by ``specmoe prepare`` and served by one
``ExpertStore`` on the store node of a local two-node Ray cluster. The driver, on the head
node, plays the decoder and fetches the whole layer, one ``fetch`` call awaited once:

* ``local`` - ``LocalSource``: the prepared files read in this process (from the page cache);
* ``ray``   - ``RaySource``: one batched ``ray.get`` of the objects the store published;
* ``grpc``  - ``GrpcSource``: the ``ExpertService.Fetch`` stream in 1 MiB chunks;

each without and with (``+crc``) the CRC-32 check against the manifest. Beside them, the same
bytes through the mechanism alone, from a plain actor on the same store node:

* ``raw ray``  - numpy arrays of the same sizes, ``ray.put`` by that actor, one ``ray.get``;
* ``raw grpc`` - a bare gRPC server (no protobuf: bytes in, bytes out) streaming the same
  tensors in 1 MiB chunks to a client that keeps the chunks it receives (as any consumer
  keeps what it fetched; our client assembles them into tensors instead);
* ``memcpy``   - ``torch`` copy of a 256 MiB buffer in this process.

Ray keeps a fetched object on the fetching node, after which a get is a local read. So every
Ray measurement gets objects that never reached the head node: before each repeat the store
publishes again (and the source refreshes its references, outside the timing, as a running
decoder holds them), and the raw actor puts fresh arrays. Repeats interleave all transports
in a shuffled order, so they share the machine's noise. GB/s = layer bytes / median time;
a transport against its raw mechanism is the median, over repeats, of their ratio in a repeat.

Writes ``<out>/transport.json`` (every raw timing, the machine, the command) and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent import futures as cf
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster  # noqa: E402,F401  (before Ray: keeps every node on 127.0.0.1)
from bench.common import REPO, command_line, machine_info, repo_relative, write_results  # noqa: E402

KB = 1 << 10
MB = 1 << 20
TRANSPORTS = ("local", "local+crc", "ray", "ray+crc", "raw ray", "grpc", "grpc+crc", "raw grpc")
RAW_METHOD = "/specmoe.bench.Raw/Stream"
TARGET = 0.70  # each transport at >= 70% of its raw mechanism


@dataclass
class BenchConfig:
    sizes_kb: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384, 32768])
    experts: int = 8
    repeats: int = 9
    chunk_kb: int = 1024
    seed: int = 0
    out: str = str(REPO / "bench" / "results")

    def __post_init__(self):
        if not self.sizes_kb or min(self.sizes_kb) < 16:
            raise ValueError(f"--sizes-kb must list sizes of at least 16 KB, got {self.sizes_kb}")
        if self.experts < 1 or self.repeats < 1:
            raise ValueError(f"--experts and --repeats must be >= 1, got {self.experts} and {self.repeats}")

    def repeats_for(self, expert_bytes: int) -> int:
        """``repeats``, and up to 5x as many for experts under 4 MB (cheap to repeat, and the noisiest)."""
        return self.repeats * max(1, min(5, 4 * MB // expert_bytes))

    @property
    def object_store_mb(self) -> int:
        # the store's published layer, the raw actor's copy, and both again on the head node
        return max(256, 3 * self.experts * max(self.sizes_kb) // KB + 128)


def expert_shape(expert_bytes: int) -> tuple[int, int]:
    """(H, I) of a bf16 expert of about ``expert_bytes`` bytes: 2 bytes * (2I*H + H*I)."""
    hidden = 512 if expert_bytes <= MB else 1024 if expert_bytes <= 4 * MB else 2048
    return hidden, max(1, round(expert_bytes / (6 * hidden)))


def synthetic_checkpoint(out: Path, hidden: int, inter: int, experts: int, seed: int) -> Path:
    """A one-layer Mixtral checkpoint with random bf16 experts under the Hub's per-expert names."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    out.mkdir(parents=True)
    MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=64).save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    prefix = "model.layers.0.block_sparse_moe"
    tensors = {f"{prefix}.gate.weight": torch.randn(experts, hidden, generator=g).bfloat16()}
    for e in range(experts):
        for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            tensors[f"{prefix}.experts.{e}.{name}.weight"] = torch.randn(*shape, generator=g).bfloat16()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def memcpy_gbps(nbytes: int = 256 * MB, repeats: int = 5) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times) / 1e9


class RawPeer:
    """On the store node: the same bytes as a layer's experts, through Ray alone and gRPC alone."""

    def __init__(self, chunk_bytes: int, max_message_bytes: int):
        import grpc

        self.chunk_bytes = chunk_bytes
        self.chunks: list[bytes] = []
        self.sizes: list[int] = []
        handler = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(self.chunks))
        service = grpc.method_handlers_generic_handler("specmoe.bench.Raw", {"Stream": handler})
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        self.server = grpc.server(cf.ThreadPoolExecutor(max_workers=4), options=options, handlers=[service])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_tensors(self, sizes: list[int]) -> None:
        """Tensors of these byte sizes, each streamed in chunks as ``ExpertService.Fetch`` does."""
        import numpy as np

        rng = np.random.default_rng(0)
        self.sizes = sizes
        tensors = [rng.bytes(size) for size in sizes]  # real bytes: zeros could be read from one shared page
        self.chunks = [t[offset : offset + self.chunk_bytes] for t in tensors for offset in range(0, len(t), self.chunk_bytes)]

    def put(self) -> list:
        """Fresh objects (never fetched by anyone) of the current sizes."""
        import numpy as np
        import ray

        return [ray.put(np.ones(size // 2, dtype=np.uint16)) for size in self.sizes]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def wait_all(futures: dict) -> None:
    for future in futures.values():  # sync: the measurement ends when every expert is here
        future.result()


def bench_size(cfg: BenchConfig, expert_kb: int, raw, tmp: Path) -> dict:
    import grpc
    import ray

    from cluster.deployment import DecodersSpec, DeploymentSpec, ModelSpec, StoreSpec, TransportSpec, build_deployment
    from actors.grpc_source import GrpcConfig
    from specmoe.expert_source import LocalSource
    from specmoe.shards import PrepareConfig, prepare

    hidden, inter = expert_shape(expert_kb * KB)
    model = synthetic_checkpoint(tmp / f"model-{expert_kb}", hidden, inter, cfg.experts, cfg.seed)
    shards = tmp / f"shards-{expert_kb}"
    manifest = prepare(PrepareConfig(model, shards), progress=False)
    sizes = [e["nbytes"] for e in sorted(manifest["tensors"], key=lambda e: (e["expert"], e["name"]))]
    layer_bytes = sum(sizes)
    experts = list(range(cfg.experts))

    chunk = cfg.chunk_kb * KB
    deployment = build_deployment(DeploymentSpec(
        name=f"bench-transport-{expert_kb}", model=ModelSpec(path=str(model), shards=str(shards)),
        stores=StoreSpec(count=1, max_restarts=0), transport=TransportSpec(kind="grpc", chunk_bytes=chunk),
        decoders=DecodersSpec(count=0),
    ))
    stores = deployment.stores
    store = stores.handles[0]
    ray.get(raw.set_tensors.remote(sizes))
    raw_stream = grpc.insecure_channel(ray.get(raw.address.remote()), options=[
        ("grpc.max_receive_message_length", 64 * MB)]).unary_stream(RAW_METHOD)
    sources = {
        "local": LocalSource(shards, verify=False), "local+crc": LocalSource(shards, verify=True),
        "ray": stores.ray_source(verify=False), "ray+crc": stores.ray_source(verify=True),
        "grpc": stores.grpc_source(GrpcConfig(chunk_bytes=chunk), verify=False),
        "grpc+crc": stores.grpc_source(GrpcConfig(chunk_bytes=chunk), verify=True),
    }

    def fresh_ray(source) -> None:  # not timed: a running decoder already holds references
        source.refresh()
        ray.get(store.publish.remote())
        source.refs_for(0, 0)

    def run(name: str) -> float:
        if name == "raw ray":
            refs = ray.get(raw.put.remote())
            return timed(lambda: ray.get(refs))
        if name == "raw grpc":
            return timed(lambda: list(raw_stream(b"")))  # kept, as any consumer keeps what it fetched
        if name.startswith("ray"):
            fresh_ray(sources[name])
        return timed(lambda: wait_all(sources[name].fetch(0, experts)))

    for name in TRANSPORTS:  # warm-up: connections, workers, page cache
        run(name)
    times: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
    order = list(TRANSPORTS)
    rng = random.Random(cfg.seed)
    for _ in range(cfg.repeats_for(expert_kb * KB)):
        rng.shuffle(order)
        for name in order:
            times[name].append(run(name))

    metrics = {name: source.metrics.snapshot() for name, source in sources.items()}
    for source in sources.values():
        source.close()
    deployment.shutdown()
    shutil.rmtree(model)
    shutil.rmtree(shards)
    return {
        "expert_kb": expert_kb, "repeats": cfg.repeats_for(expert_kb * KB), "hidden": hidden, "intermediate": inter, "expert_bytes": layer_bytes // cfg.experts,
        "layer_bytes": layer_bytes, "times_s": times,
        "gbps": {name: layer_bytes / statistics.median(t) / 1e9 for name, t in times.items()},
        "median_ms": {name: 1000 * statistics.median(t) for name, t in times.items()},
        # ours against raw, repeat by repeat (the two ran in the same shuffled round, so share its noise)
        "vs_raw": {name: statistics.median(raw / ours for ours, raw in zip(times[name], times[f"raw {name}"]))
                   for name in ("ray", "grpc")},
        "metrics": metrics,
    }


def run(cfg: BenchConfig) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.local import ClusterSpec, LocalCluster

    load_before = os.getloadavg()[0]
    memcpy = memcpy_gbps()
    rows = []
    with LocalCluster(ClusterSpec(stores=1, decoders=0, object_store_mb=cfg.object_store_mb)) as cluster:
        node = cluster.store_nodes[0].node_id
        raw = ray.remote(num_cpus=0)(RawPeer).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote(cfg.chunk_kb * KB, 64 * MB)
        with tempfile.TemporaryDirectory(prefix="specmoe-bench-") as tmp:
            for kb in cfg.sizes_kb:
                rows.append(bench_size(cfg, kb, raw, Path(tmp)))
                print(f"[bench] {kb} KB: " + ", ".join(f"{n} {g:.2f}" for n, g in rows[-1]["gbps"].items()) + " GB/s",
                      file=sys.stderr)
        ray.kill(raw)
    return {"config": asdict(cfg) | {"out": repo_relative(cfg.out)}, "machine": machine_info(), "command": command_line(),
            "memcpy_gbps": memcpy, "target": TARGET, "load_average": [load_before, os.getloadavg()[0]], "rows": rows}


def size_label(nbytes: int) -> str:
    return f"{nbytes / MB:.2f} MB" if nbytes >= MB else f"{nbytes / KB:.0f} KB"


def versus(ratio: float, target: float) -> str:
    return f"{int(100 * ratio)}%" + ("" if ratio >= target else " (below target)")  # truncated: 69.6% is not 70%


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [
        "# Expert transports: a layer's experts, each transport next to its raw mechanism",
        "",
        f"`{report['command']}`",
        "",
        f"{c['experts']} bf16 experts per layer, one `fetch` per layer awaited once, median of n repeats; "
        f"store on a store node, fetcher on the head node of a local Ray cluster; gRPC chunks of {c['chunk_kb']} KB. "
        f"Memory copy in the same run: **{report['memcpy_gbps']:.1f} GB/s**. "
        f"`+crc`: received bytes checked against the manifest's CRC-32. "
        f"Target: each transport (without the check) at >= {report['target']:.0%} of its raw mechanism.",
        "",
        "GB/s (median ms per layer). `ray / raw` and `grpc / raw`: throughput against the raw mechanism, "
        "the median over repeats of the ratio within a repeat (both ran in the same shuffled round).",
        "",
        "| expert | layer | n | local | local+crc | ray | ray+crc | raw ray | ray / raw | grpc | grpc+crc | raw grpc | grpc / raw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        g, ms = row["gbps"], row["median_ms"]

        def cell(name: str) -> str:
            return f"{g[name]:.2f} ({ms[name]:.1f})"

        lines.append(
            f"| {size_label(row['expert_bytes'])} | {size_label(row['layer_bytes'])} | {row['repeats']} | {cell('local')} | {cell('local+crc')} "
            f"| {cell('ray')} | {cell('ray+crc')} | {cell('raw ray')} | {versus(row['vs_raw']['ray'], report['target'])} "
            f"| {cell('grpc')} | {cell('grpc+crc')} | {cell('raw grpc')} | {versus(row['vs_raw']['grpc'], report['target'])} |"
        )
    m = report["machine"]
    load = report["load_average"]
    lines += ["", f"Machine: {m['cpu']}, {m['cpu_count']} CPUs; torch {m['torch']}, Python {m['python']}; {m['date']}; "
              f"1-minute load average {load[0]:.1f} before the run, {load[1]:.1f} after.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-kb", type=int, nargs="+", default=BenchConfig().sizes_kb, help="expert sizes")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (one fetch moves all of them)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chunk-kb", type=int, default=1024, help="gRPC chunk size (ours and the raw stream)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    cfg = BenchConfig(args.sizes_kb, args.experts, args.repeats, args.chunk_kb, args.seed, args.out)
    report = run(cfg)
    md = markdown(report)
    write_results(Path(cfg.out) / "transport", report, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
