"""The ``specmoe`` command line.

Each subcommand is a row of ``COMMANDS``: (name, help, add_arguments, run). Only the
generated text goes to standard output; diagnostics and statistics go to standard error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from specmoe.detokenizer import IncrementalDetokenizer


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from specmoe.config import SHIPPED_MODEL

    parser.add_argument("--model", default=str(SHIPPED_MODEL), help="Hugging Face model directory (default: the shipped model)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")


def run_generate(args: argparse.Namespace) -> int:
    from specmoe.config import EngineConfig
    from specmoe.engine import Engine
    from specmoe.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    started = time.perf_counter()
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, max_batch_size=1))
    loaded = time.perf_counter()
    detok = IncrementalDetokenizer(engine.tokenizer)
    n = 0
    for token_ids in engine.stream(args.prompt, params):
        if n == 0:
            first = time.perf_counter()
        n += len(token_ids)
        sys.stdout.write(detok.push(token_ids))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    done = time.perf_counter()
    decode_rate = (n - 1) / (done - first) if n > 1 else 0.0
    print(
        f"[specmoe] load {loaded - started:.2f}s | {n} tokens | first token {first - loaded:.3f}s | "
        f"decode {decode_rate:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("generate", "generate text from a prompt (streams to stdout)", add_generate_arguments, run_generate),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # user mistakes: one clear line, no traceback
        print(f"specmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
