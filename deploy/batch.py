"""Batch runs: a JSONL file of prompts through a deployment's coordinator, to a JSONL of results.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m deploy.batch --spec spec.yaml --input /data/prompts.jsonl --output /data/results.jsonl

**Input**, one JSON object a line: ``id`` (a string or an integer, unique in the file), then
``prompt`` (text, or a list of token ids) or ``messages`` (chat: ``[{"role", "content"}]``,
checked and made a prompt exactly as the Serve app does, ``deploy.serve.protocol``), and optional
parameters ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` (a
string or a list of them). Blank lines are skipped.

**Output**, one JSON object a line, in the order requests finish::

    {"id": ..., "text": ..., "token_ids": [...], "finish_reason": "length",
     "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19},
     "metrics": {"rounds": ..., "drafted": ..., "accepted": ..., "acceptance_rate": ...,
                 "tokens_per_round": ..., "time_to_first_token_s": ..., ...}}

A line that cannot run (bad JSON, no id, neither or both of prompt and messages, an unknown
key or a bad parameter value, a duplicate id, a prompt the model refuses) is reported on
stderr with its line number and id, and written to the output as an error line
``{"id", "line", "finish_reason": "error", "error"}`` (``"id": null`` when the line has no
usable id), so every input line is accounted for once. The other lines still run, and the
job succeeds; the last line on stderr counts the errors.

**Resumable.** Ids already in the output are skipped, so running the same command again
after the job was killed finishes the rest. Each line is written whole and then flushed and
fsynced; a torn last line (a kill in the middle of a write) is cut off on start, so every id
appears exactly once.

**Continuously batched.** Up to ``--window`` requests are in flight at once (new ones are
submitted as others finish; ``Overloaded`` is retried after a pause), and the coordinator
batches them onto its decoders. Progress goes to stderr (the job's logs). A stopped job
(``ray job stop``, SIGTERM) aborts its requests in flight before it exits.

**The deployment** is the spec's: started by the first run (``build_deployment``: detached
named actors, which outlive the job) and attached to by later runs, or by a Serve app of the
same spec. Give the spec an absolute ``model.path``: a path inside the job's uploaded working
directory changes with the directory's contents, and a decoder is only attached to when its
configuration (the model path included) is the spec's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PARAMETERS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "seed": "seed", "stop": "stop"}
KEYS = ("id", "prompt", "messages", *PARAMETERS)


class BadLine(ValueError):
    """An input line that cannot run; says which and why."""

    def __init__(self, line: int, item_id, reason: str):
        self.line, self.id, self.reason = line, item_id, reason
        super().__init__(f"line {line}" + (f" (id {json.dumps(item_id)})" if item_id is not None else "") + f": {reason}")


@dataclass
class Item:
    line: int
    id: str | int
    prompt: str | list[int]
    params: object  # actors.coordinator.GenerationParams


@dataclass
class Config:
    spec: str
    input: Path
    output: Path
    address: str | None = "auto"
    window: int = 64
    max_tokens: int | None = None  # for lines that set none
    poll_s: float = 1.0
    overload_pause_s: float = 0.5

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.input.resolve() == self.output.resolve():
            raise ValueError(f"--output must not be the input file ({self.input})")


# -- input -------------------------------------------------------------------------------------


def id_key(item_id) -> str:
    """Ids compare as JSON: ``1`` and ``"1"`` are different ids."""
    return json.dumps(item_id)


def parse_line(number: int, text: str, default_max_tokens: int | None = None, tokenizer=None) -> Item:
    """One input line as an ``Item``; ``BadLine`` naming the line, its id and the problem.
    ``tokenizer``: a callable returning the tokenizer (loaded only for ``messages``)."""
    from actors.coordinator import GenerationParams

    try:
        data = json.loads(text)
    except ValueError as err:
        raise BadLine(number, None, f"not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BadLine(number, None, f"must be a JSON object, got {type(data).__name__}")
    item_id = data.get("id")
    if not usable_id(item_id):
        raise BadLine(number, item_id, "needs an 'id': a non-empty string or an integer")
    unknown = sorted(k for k in data if k not in KEYS)
    if unknown:
        raise BadLine(number, item_id, f"unknown keys {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    if ("prompt" in data) == ("messages" in data):
        raise BadLine(number, item_id, "needs exactly one of 'prompt' (text or token ids) and 'messages' (chat)")
    try:
        prompt = data["prompt"] if "prompt" in data else _chat(data["messages"], tokenizer)
        _check_prompt(prompt)
        values = {PARAMETERS[k]: v for k, v in data.items() if k in PARAMETERS}
        if default_max_tokens is not None:
            values.setdefault("max_new_tokens", default_max_tokens)
        for name in ("max_new_tokens", "top_k", "seed"):
            if isinstance(values.get(name), bool):
                raise ValueError(f"{name} must be an integer, got {values[name]!r}")
        params = GenerationParams(**values)
    except ValueError as err:
        raise BadLine(number, item_id, str(err).replace("max_new_tokens", "max_tokens")) from None
    return Item(number, item_id, prompt, params)


def _chat(messages, tokenizer) -> str:
    """The Serve app's chat prompt: the same checks of the messages, the same template."""
    from deploy.serve.protocol import ApiError, chat_prompt, parse_request

    try:  # the model's name does not matter here: only the messages are used
        checked = parse_request("chat", {"model": "batch", "messages": messages}).messages
    except ApiError as err:
        raise ValueError(err.message) from None
    tokenizer = tokenizer() if tokenizer is not None else None
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot take chat messages; send a prompt of token ids")
    return chat_prompt(tokenizer, checked)


def _check_prompt(prompt) -> None:
    if isinstance(prompt, str) and prompt:
        return
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return
    raise ValueError(f"prompt must be non-empty text or a non-empty list of token ids >= 0, got {prompt!r:.80}")


def usable_id(item_id) -> bool:
    return isinstance(item_id, (str, int)) and not isinstance(item_id, bool) and item_id != ""


def read_items(path: Path, results: Results, default_max_tokens: int | None, tokenizer) -> Iterator[Item | BadLine]:
    """The input's items and bad lines that ``results`` does not hold yet, in file order."""
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                item = parse_line(number, text, default_max_tokens, tokenizer)
            except BadLine as bad:
                if not results.holds(bad):
                    yield bad
                continue
            key = id_key(item.id)
            if key in seen:
                # written with "id": null: the id's own result comes from its first line
                bad = BadLine(number, None, f"duplicate id {key} (first on line {seen[key]}); this line is not run")
                if not results.holds(bad):
                    yield bad
                continue
            seen[key] = number
            if key not in results.done:
                yield item


# -- output ------------------------------------------------------------------------------------


class Results:
    """The output JSONL: the ids it holds, and whole-line appends (write, flush, fsync)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()  # id keys written
        self.lines: set[int] = set()  # input lines written as errors without a usable id
        self._recover()
        self.file = open(path, "a", encoding="utf-8")

    def holds(self, bad: BadLine) -> bool:
        return id_key(bad.id) in self.done if usable_id(bad.id) else bad.line in self.lines

    def _recover(self) -> None:
        """Read what is written; a torn last line (no newline at its end) is cut off."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not ours to judge: left as it is
            if isinstance(record, dict):
                self._note(record)

    def _note(self, record: dict) -> None:
        if usable_id(record.get("id")):
            self.done.add(id_key(record["id"]))
        elif isinstance(record.get("line"), int):
            self.lines.add(record["line"])

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self._note(record)

    def close(self) -> None:
        self.file.close()


def result_record(item: Item, text: str, token_ids: list[int], chunk) -> dict:
    metrics = dict(chunk.metrics or {})
    prompt_tokens = metrics.pop("prompt_tokens", None)
    completion = metrics.pop("output_tokens", len(token_ids))
    record = {"id": item.id, "text": text, "token_ids": token_ids, "finish_reason": chunk.finish_reason,
              "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                        "total_tokens": (prompt_tokens or 0) + completion},
              "metrics": metrics}
    if chunk.finish_reason == "error":
        record["error"] = chunk.error
    return record


def error_record(item_id, line: int, error: str) -> dict:
    return {"id": item_id, "line": line, "finish_reason": "error", "error": error}


# -- the run -----------------------------------------------------------------------------------


@dataclass
class InFlight:
    item: Item
    request_id: str
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    chars: int = 0

    @property
    def cursor(self) -> tuple[int, int]:
        return len(self.tokens), self.chars


@dataclass
class Summary:
    written: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output


def run(config: Config, client, results: Results, tokenizer=None, progress=None) -> Summary:
    """Run every input line not yet in ``results`` through ``client`` (a ``deploy.client.Client``)."""
    from actors.coordinator import Overloaded

    summary = Summary(skipped=len(results.done) + len(results.lines))
    pending = read_items(config.input, results, config.max_tokens, tokenizer)
    run_id = uuid.uuid4().hex[:12]
    flying: dict[str, InFlight] = {}
    next_item = None
    exhausted = False
    try:
        while True:
            while not exhausted and len(flying) < config.window:  # fill the window
                next_item = next_item or next(pending, None)
                if next_item is None:
                    exhausted = True
                    break
                if isinstance(next_item, BadLine):
                    _report(results, summary, next_item, progress)
                    next_item = None
                    continue
                try:
                    rid = client.submit(next_item.prompt, next_item.params, f"batch-{run_id}-{next_item.line}")
                except Overloaded:
                    if not flying:
                        time.sleep(config.overload_pause_s)
                    break  # try again after the next poll
                except ValueError as err:  # the coordinator refused the prompt
                    _report(results, summary, BadLine(next_item.line, next_item.id, str(err)), progress)
                else:
                    flying[rid] = InFlight(next_item, rid)
                next_item = None
            if not flying:
                if exhausted:
                    return summary
                continue
            _poll(client, flying, results, summary, config.poll_s, progress)
    finally:
        for rid in flying:  # killed or failed: free the coordinator's slots
            try:
                client.abort(rid)
            except Exception:  # noqa: BLE001 - best effort: the coordinator also reaps abandoned requests
                pass


def _poll(client, flying: dict[str, InFlight], results: Results, summary: Summary, timeout_s: float, progress) -> None:
    # one long poll for every request in flight (the coordinator's poll, with the client's reconnects)
    chunks = client._call("poll", {rid: f.cursor for rid, f in flying.items()}, timeout_s)
    for rid, chunk in chunks.items():
        f = flying[rid]
        f.tokens += chunk.token_ids
        f.text.append(chunk.text)
        f.chars += len(chunk.text)
        if chunk.finished:
            del flying[rid]
            results.write(result_record(f.item, "".join(f.text), f.tokens, chunk))
            summary.written += 1
            summary.errors += chunk.finish_reason == "error"
            if chunk.finish_reason == "error":
                print(f"[specmoe batch] line {f.item.line} (id {json.dumps(f.item.id)}): {chunk.error}", file=sys.stderr)
            if progress is not None:
                progress.update(1)


def _report(results: Results, summary: Summary, bad: BadLine, progress) -> None:
    print(f"[specmoe batch] {bad}", file=sys.stderr)
    summary.errors += 1
    if not results.holds(bad):
        results.write(error_record(bad.id if usable_id(bad.id) else None, bad.line, bad.reason))
        summary.written += 1
    if progress is not None:
        progress.update(1)


# -- the command -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m deploy.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the deployment spec (YAML or JSON) to run on, or attach to")
    parser.add_argument("--input", required=True, type=Path, help="JSONL of prompts")
    parser.add_argument("--output", required=True, type=Path, help="JSONL of results; ids already there are skipped")
    parser.add_argument("--address", default="auto", help="the Ray cluster (default: auto, the job's own cluster)")
    parser.add_argument("--window", type=int, default=64, help="requests in flight at once (default: 64)")
    parser.add_argument("--max-tokens", type=int, default=None, help="for lines that set no max_tokens")
    args = parser.parse_args(argv)
    return Config(args.spec, args.input, args.output, args.address, args.window, args.max_tokens)


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
        from cluster.deployment import DeploymentSpec

        spec = DeploymentSpec.from_file(config.spec)
        total = count_lines(config.input)
    except (ValueError, OSError) as err:
        print(f"[specmoe batch] error: {err}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from deploy.client import connect
    from specmoe.engine import load_tokenizer

    signal.signal(signal.SIGTERM, _exit_on_term)  # `ray job stop`: abort what is in flight, then exit
    tokenizer_cache = []

    def tokenizer():
        if not tokenizer_cache:
            tokenizer_cache.append(load_tokenizer(spec.model.path))
        return tokenizer_cache[0]

    results = Results(config.output)  # cuts a torn last line
    client = connect(config.address, spec)
    try:
        with tqdm(total=total, initial=min(len(results.done) + len(results.lines), total), desc="batch", unit="req", file=sys.stderr,
                  mininterval=1.0 if sys.stderr.isatty() else 5.0, ascii=not sys.stderr.isatty()) as progress:
            summary = run(config, client, results, tokenizer, progress)
    finally:
        results.close()
        client.close()
    print(f"[specmoe batch] {summary.written} lines written ({summary.errors} errors), {summary.skipped} were "
          f"already in {config.output}", file=sys.stderr)
    return 0


def _exit_on_term(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
