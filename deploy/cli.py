"""The ``specmoe`` command line.

Each subcommand is a row of ``COMMANDS``: (name, help, add_arguments, run). Only the
generated text goes to standard output; diagnostics and statistics go to standard error.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Callable

from specmoe.detokenizer import IncrementalDetokenizer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from specmoe.config import SHIPPED_MODEL

    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="Hugging Face model directory (default: the shipped model)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    from specmoe.config import DRAFT_POLICIES, HOT_SETS, MIGRATIONS, MODES, SUBSTITUTIONS

    from specmoe.config import DecoderConfig

    default = DecoderConfig()  # the defaults live there, once
    parser.add_argument("--mode", choices=MODES, default=default.mode,
                        help="where experts live and how transfers are hidden: "
                             + "; ".join(f"{m.name}: {m.help}" for m in MODES.values()).replace("%", "%%"))
    parser.add_argument("--draft-policy", choices=DRAFT_POLICIES, default=default.draft_policy,
                        help="how specmoe drafts without moving bytes: resident experts only, a low-bit shadow of "
                             "every expert, or hot (the paper's: a few pinned experts per layer, a pick outside them "
                             "replaced by its nearest pinned expert)")
    parser.add_argument("--shadow-bits", type=int, choices=(4, 8), default=default.shadow_bits,
                        help="bits of the shadow draft policy's copies: 4 (the least memory) or 8 (twice that, "
                             "drafts closer to the model: more tokens accepted per round)")
    parser.add_argument("--hot-experts", type=int, default=default.hot_experts,
                        help="pinned experts per layer of the hot draft policy")
    parser.add_argument("--hot-set", choices=HOT_SETS, default=default.hot_set,
                        help="which experts the hot draft policy pins: temporal (the paper's: the resident ones recent "
                             "verification passes used most), global (the --profile's hottest per layer, fixed) or "
                             "random (seeded, fixed)")
    parser.add_argument("--substitution", choices=SUBSTITUTIONS, default=default.substitution,
                        help="what a hot draft pick outside the pinned experts runs: affinity (its nearest pinned "
                             "expert, by the table `specmoe prepare` computes) or random (a seeded random pinned expert)")
    parser.add_argument("--trace", default=None,
                        help="the overlap mode's routing trace of the same run (specmoe.trace.record_trace writes it)")
    parser.add_argument("--migration", choices=MIGRATIONS, default=default.migration,
                        help="when specmoe requests the draft's predicted experts: eager (as each draft step predicts "
                             "them) or deferred (once, coalesced, when verification starts)")
    parser.add_argument("--k", default=str(default.k), help=f"draft tokens per round: an integer or 'auto' (default {default.k})")
    parser.add_argument("--k-max", type=int, default=default.k_max)
    parser.add_argument("--cache-budget", default=str(default.cache_budget),
                        help="expert cache: a fraction of the expert bytes (25%% or 0.25) or a size (64MB, 1.5GiB, 1000000B)")
    parser.add_argument("--profile", default=None, help="routing profile (from `specmoe profile`) whose hottest experts are pinned")
    parser.add_argument("--experts", choices=["local", "ray", "grpc"], default="local",
                        help="where non-resident experts come from: in-process, an ExpertStore over Ray, or over gRPC")
    parser.add_argument("--remote-compute", action="store_true",
                        help="run a missed expert with few tokens on its store (needs --experts grpc)")
    parser.add_argument("--grpc-token", default=None,
                        help="bearer token the expert stores require and the decoder sends (needs --experts grpc)")
    parser.add_argument("--grpc-tls-cert", default=None, help="PEM certificate the stores serve gRPC with (needs --grpc-tls-key)")
    parser.add_argument("--grpc-tls-key", default=None, help="PEM private key of --grpc-tls-cert")
    parser.add_argument("--link-gbps", type=float, default=None,
                        help="put the experts behind an emulated link of this bandwidth, in GB/s (one FIFO per decoder)")
    parser.add_argument("--link-latency-us", type=float, default=None,
                        help="the emulated link's latency per request, in microseconds (default 0)")
    parser.add_argument("--link-r", type=float, default=None,
                        help="set the emulated link's bandwidth from R: moving one token's active expert bytes takes "
                             "R resident decode steps (batch 1, measured here); real deployments sit at R = 30 to 250")
    parser.set_defaults(check=check_decoder_arguments)


def check_decoder_arguments(args: argparse.Namespace) -> None:
    """Refuse flags that would be silently ignored, before anything starts."""
    from specmoe.config import MODES

    offloaded = MODES[args.mode].offloaded
    if not offloaded and args.experts != "local":
        raise ValueError(f"--experts {args.experts} has no effect with --mode resident (every expert is loaded locally); "
                         "choose --mode ondemand, pregate or specmoe, or leave out --experts")
    if args.remote_compute and (args.experts != "grpc" or not offloaded):
        raise ValueError(f"--remote-compute needs --experts grpc and a mode that fetches experts, "
                         f"got --experts {args.experts} --mode {args.mode}")
    from specmoe.config import DecoderConfig

    default = DecoderConfig()
    hot_flags = [f for f, v, d in (("--hot-set", args.hot_set, default.hot_set),
                                   ("--substitution", args.substitution, default.substitution)) if v != d]
    if hot_flags and not (MODES[args.mode].speculative and args.draft_policy == "hot"):
        raise ValueError(f"{', '.join(hot_flags)} configure the hot draft policy and need --draft-policy hot with a "
                         f"speculative mode, got --draft-policy {args.draft_policy} --mode {args.mode}")
    if args.shadow_bits != default.shadow_bits and not (MODES[args.mode].speculative and args.draft_policy == "shadow"):
        raise ValueError(f"--shadow-bits sizes the shadow draft policy's copies and needs --draft-policy shadow with a "
                         f"speculative mode, got --draft-policy {args.draft_policy} --mode {args.mode}")
    if args.trace is not None and not MODES[args.mode].oracle:
        raise ValueError(f"--trace is replayed by --mode overlap only, got --mode {args.mode}")
    grpc_flags = [f for f, v in [("--grpc-token", args.grpc_token), ("--grpc-tls-cert", args.grpc_tls_cert),
                                 ("--grpc-tls-key", args.grpc_tls_key)] if v is not None]
    if grpc_flags and args.experts != "grpc":
        raise ValueError(f"{', '.join(grpc_flags)} secure the gRPC transport and need --experts grpc, got --experts {args.experts}")
    if (args.grpc_tls_cert is None) != (args.grpc_tls_key is None):
        raise ValueError("--grpc-tls-cert and --grpc-tls-key go together (PEM files): give both or neither")
    link_flags = [f for f, v in (("--link-gbps", args.link_gbps), ("--link-latency-us", args.link_latency_us),
                                 ("--link-r", args.link_r)) if v is not None]
    if link_flags and not offloaded:
        raise ValueError(f"{link_flags[0]} has no effect with --mode resident (no expert crosses a link); "
                         "choose --mode ondemand, pregate or specmoe")
    if args.link_gbps is not None and args.link_r is not None:
        raise ValueError(f"--link-gbps {args.link_gbps} and --link-r {args.link_r} both set the link's bandwidth; give one")
    for flag, value, allowed in (("--link-gbps", args.link_gbps, "GB/s > 0"), ("--link-r", args.link_r, "a number > 0"),
                                 ("--link-latency-us", args.link_latency_us, "microseconds >= 0")):
        if value is not None and not (math.isfinite(value) and (value >= 0 if flag == "--link-latency-us" else value > 0)):
            raise ValueError(f"{flag} must be {allowed}, got {value}")


def link_config(args: argparse.Namespace):
    """The emulated link the flags ask for (None: none). With ``--link-r`` the bandwidth is set
    from this machine's resident step and the model's active expert bytes, and printed."""
    from specmoe.link import LinkConfig, link_for_r

    if args.link_gbps is None and args.link_latency_us is None and args.link_r is None:
        return None
    gbps = args.link_gbps
    if args.link_r is not None:
        c = link_for_r(args.model, args.link_r, args.dtype)
        gbps = c.gbps
        print(f"[specmoe] link at R={c.r:g}: resident step {1000 * c.step_s:.2f} ms at batch 1, "
              f"{c.active_bytes} active expert bytes per token -> {gbps:.4g} GB/s", file=sys.stderr)
    return LinkConfig(gbps=gbps, latency_us=args.link_latency_us or 0.0)


def decoder_config(args: argparse.Namespace):
    from specmoe.config import DecoderConfig, parse_budget

    k = args.k if args.k == "auto" else _int(args.k, "--k")
    parse_budget(args.cache_budget, "--cache-budget")  # a bad value is named by its flag
    return DecoderConfig(
        mode=args.mode,
        draft_policy=args.draft_policy,
        k=k,
        k_max=args.k_max,
        cache_budget=args.cache_budget,
        profile=args.profile,
        remote_compute=args.remote_compute,
        migration=args.migration,
        shadow_bits=args.shadow_bits,
        hot_experts=args.hot_experts,
        hot_set=args.hot_set,
        substitution=args.substitution,
        trace=args.trace,
    )


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} must be an integer or 'auto', got {text!r}") from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    add_decoder_arguments(parser)


def run_generate(args: argparse.Namespace) -> int:
    from specmoe.config import EngineConfig
    from specmoe.engine import Engine
    from specmoe.metrics import summarize
    from specmoe.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if args.experts != "local":
        return generate_on_cluster(args, params)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_batch_size=1, decoder=decoder_config(args))
    link, fetch = link_config(args), None
    if link is not None:
        from specmoe.link import EmulatedLink
        from specmoe.offload import checkpoint_fetcher

        fetch = EmulatedLink(checkpoint_fetcher(args.model), link)
    started = time.perf_counter()
    engine = Engine(config, fetch=fetch)
    loaded = time.perf_counter()
    detok = IncrementalDetokenizer(engine.tokenizer)
    n = 0
    for token_ids in engine.stream(args.prompt, params):
        n += len(token_ids)
        sys.stdout.write(detok.push(token_ids))
        sys.stdout.flush()
        if CTRL_C.is_set():
            raise KeyboardInterrupt
    sys.stdout.write(detok.flush() + "\n")
    wall = time.perf_counter() - loaded
    print(f"[specmoe] model loaded in {loaded - started:.2f}s", file=sys.stderr)
    link_figures = {k: v for k, v in fetch.metrics.snapshot().items() if k.startswith("link_")} if fetch else {}
    print_metrics(summarize(engine, n, wall) | link_figures)
    return 0


def generate_on_cluster(args: argparse.Namespace, params) -> int:
    """``--experts ray|grpc``: the service path. ``connect()`` starts a local multi-node cluster
    and the deployment (an ExpertStore on a store node, a Decoder actor on a decoder node, the
    Coordinator); the prompt streams back through the coordinator."""
    from cluster.deployment import DecodersSpec, DeploymentSpec, ModelSpec, TransportSpec
    from deploy.client import connect

    spec = DeploymentSpec(
        model=ModelSpec(path=args.model, dtype=args.dtype),
        transport=TransportSpec(kind=args.experts, token=args.grpc_token, tls_cert=args.grpc_tls_cert,
                                tls_key=args.grpc_tls_key, link=link_config(args)),
        decoders=DecodersSpec(count=1, config=decoder_config(args)),
    )
    started = time.perf_counter()
    with connect(spec=spec) as client:
        loaded = time.perf_counter()
        last = None
        for piece in client.stream(args.prompt, params):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            last = piece
            if CTRL_C.is_set():
                raise KeyboardInterrupt
        sys.stdout.write("\n")
        decoder = next((m for m in client.decoder_metrics() if m), {})
    print(f"[specmoe] cluster and deployment up in {loaded - started:.2f}s", file=sys.stderr)
    transport = decoder.pop("transport", {})
    print_metrics(last.metrics | decoder | {f"transport_{k}": v for k, v in transport.items()})
    return 0


def print_metrics(metrics: dict) -> None:
    width = max(len(k) for k in metrics)
    for name, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"[specmoe] {name:<{width}}  {shown}", file=sys.stderr)


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, help="calibration text file (prompts are windows of it)")
    parser.add_argument("--out", required=True, help="where to write the profile (JSON)")
    parser.add_argument("--prompts", type=int, default=32, help="number of calibration prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)


def run_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specmoe.config import EngineConfig
    from specmoe.engine import Engine
    from specmoe.profile import calibration_prompts, record_profile

    text_path = Path(args.text)
    if not text_path.is_file():
        raise ValueError(f"calibration text {args.text!r} does not exist")
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, max_batch_size=16))
    prompts = calibration_prompts(text_path.read_text(encoding="utf-8"), args.prompts)
    profile = record_profile(engine, prompts, args.max_new_tokens)
    profile.save(args.out)
    print(f"[specmoe] profiled {profile.tokens} tokens over {len(profile.counts)} layers -> {args.out}", file=sys.stderr)
    return 0


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from specmoe.shards import add_prepare_arguments as add

    add(parser)


def run_prepare(args: argparse.Namespace) -> int:
    from specmoe.shards import run_prepare as run

    return run(args)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    from cluster.local import add_cluster_arguments as add

    add(parser)


def run_cluster(args: argparse.Namespace) -> int:
    from cluster.local import run_cluster as run

    return run(args)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", default=None,
                        help="deployment spec, YAML or JSON (default: the shipped model in specmoe mode, one store, one decoder)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes (default: open)")
    parser.add_argument("--model-name", default=None, help="the served model id (default: the model directory's name)")


def run_serve(args: argparse.Namespace) -> int:
    from deploy.serve.app import serve_locally

    return serve_locally(args.spec, args.port, args.api_key, args.model_name, CTRL_C)


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("generate", "generate text from a prompt (streams to stdout)", add_generate_arguments, run_generate),
    ("profile", "record how often each expert is routed to on calibration text", add_profile_arguments, run_profile),
    ("prepare", "split a checkpoint into a dense part and per-expert shards with a manifest", add_prepare_arguments, run_prepare),
    ("cluster", "start or stop a local multi-node Ray cluster (head, store nodes, decoder nodes)", add_cluster_arguments, run_cluster),
    ("serve", "serve the OpenAI API over a local multi-node cluster until Ctrl-C", add_serve_arguments, run_serve),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C: scripts can tell it from a mistake (2)
# Set by Ctrl-C. The KeyboardInterrupt it raises lands wherever the main thread is; inside a
# finalizer or a callback Python only prints it and goes on, so loops also check this flag.
CTRL_C = threading.Event()


def main(argv: list[str] | None = None) -> int:
    """Run one command. User mistakes, unreadable or corrupt files and Ctrl-C end in one line
    on standard error, never a traceback: exit 2 for an error, 130 for an interrupt."""
    args = build_parser().parse_args(argv)
    CTRL_C.clear()
    previous = _on_ctrl_c()
    try:
        code = _run(args)
    except KeyboardInterrupt:
        code = INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if code == INTERRUPTED or CTRL_C.is_set():
        print(f"specmoe {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return code


def _on_ctrl_c():
    """Record Ctrl-C in ``CTRL_C`` and raise KeyboardInterrupt as Python does; returns the
    handler it replaced (None off the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        CTRL_C.set()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, handler)


def _run(args: argparse.Namespace) -> int:
    from specmoe.shards import CorruptShardError

    try:
        if hasattr(args, "check"):
            args.check(args)
        return args.run(args)
    except (ValueError, OSError, CorruptShardError) as err:
        print(f"specmoe {args.command}: error: {_cause(err)}", file=sys.stderr)
        return 2


def _cause(err: BaseException) -> str:
    """The error's own message, without the traceback a Ray worker wraps around it."""
    cause = getattr(err, "cause", None)
    return str(cause) if isinstance(cause, BaseException) else str(err)


if __name__ == "__main__":
    sys.exit(main())
