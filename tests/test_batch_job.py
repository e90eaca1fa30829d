"""Batch runs (``deploy.batch``) submitted with ``ray job submit`` to a real ``ray start --head``,
and the Prometheus metrics on that cluster's metrics endpoint.

The cluster is started in a session of its own and stopped by killing that session's
processes, by id (``ray stop`` would stop every Ray cluster of the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.batch import BadLine, Results, parse_line, read_items

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TOKENS = 24
PROMPTS = ["ROMEO:", "JULIET:", "KING RICHARD III:", "First Citizen:", "MENENIUS:", "Second Servingman:",
           "DUKE VINCENTIO:", "LADY CAPULET:", "GLOUCESTER:", "Nurse:", "HERMIONE:", "PETRUCHIO:"]
CHAT = [{"role": "user", "content": "Who is Romeo?"}]


# -- input and output, without a cluster ------------------------------------------------------


@pytest.mark.parametrize("text, line_id, words", [
    ("{not json", None, "not valid JSON"),
    ('["a list"]', None, "JSON object"),
    ('{"prompt": "ROMEO:"}', None, "needs an 'id'"),
    ('{"id": true, "prompt": "ROMEO:"}', True, "needs an 'id'"),
    ('{"id": "a"}', "a", "exactly one of 'prompt'"),
    ('{"id": "a", "prompt": "x", "messages": []}', "a", "exactly one of 'prompt'"),
    ('{"id": "a", "prompt": ""}', "a", "prompt must be non-empty"),
    ('{"id": "a", "prompt": [1, -2]}', "a", "prompt must be non-empty"),
    ('{"id": 7, "prompt": "x", "max_tokens": 0}', 7, "max_tokens must be an integer >= 1"),
    ('{"id": 7, "prompt": "x", "max_tokens": true}', 7, "max_tokens must be an integer"),
    ('{"id": "a", "prompt": "x", "temperature": -1}', "a", "temperature must be a finite number >= 0"),
    ('{"id": "a", "prompt": "x", "top_p": 2}', "a", "top_p must be in (0, 1]"),
    ('{"id": "a", "prompt": "x", "stop": [""]}', "a", "stop must be a list of non-empty strings"),
    ('{"id": "a", "prompt": "x", "best_of": 2}', "a", "unknown keys best_of"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "hi"}]}', "a", "messages[0].role must be one of"),
    ('{"id": "a", "messages": []}', "a", "messages must not be empty"),
])
def test_a_bad_line_is_named_by_its_line_number_id_and_problem(text, line_id, words):
    with pytest.raises(BadLine) as err:
        parse_line(12, text, tokenizer=lambda: None)
    assert err.value.line == 12 and err.value.id == line_id
    assert str(err.value).startswith("line 12") and words in str(err.value)
    if line_id is not None:
        assert f"(id {json.dumps(line_id)})" in str(err.value)


def test_a_good_line_becomes_a_request(shipped_model):
    from specmoe.engine import load_tokenizer

    item = parse_line(3, json.dumps({"id": 5, "messages": CHAT, "max_tokens": 8, "temperature": 0.5, "seed": 1,
                                     "stop": "\n"}), tokenizer=lambda: load_tokenizer(shipped_model))
    assert (item.line, item.id, item.prompt) == (3, 5, "User:\nWho is Romeo?\n\nAssistant:\n")  # the Serve app's template
    assert (item.params.max_new_tokens, item.params.temperature, item.params.seed, item.params.stop) == (8, 0.5, 1, ("\n",))
    assert parse_line(4, '{"id": "x", "prompt": [5, 6]}', default_max_tokens=9).params.max_new_tokens == 9


def test_a_torn_last_line_is_cut_and_what_was_written_is_skipped(tmp_path):
    out, src = tmp_path / "results.jsonl", tmp_path / "prompts.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": null, "line": 4, "error": "e"}\n{"id": "b", "te')
    src.write_text("\n".join(['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', "",
                              "{not json", '{"id": "a", "prompt": "again"}', '{"id": 3, "prompt": "z"}']) + "\n")
    results = Results(out)
    assert out.read_text() == '{"id": "a", "text": "x"}\n{"id": null, "line": 4, "error": "e"}\n'
    assert results.done == {'"a"'} and results.lines == {4}
    pending = list(read_items(src, results, None, None))
    assert [(type(p).__name__, p.line) for p in pending] == [("Item", 2), ("BadLine", 5), ("Item", 6)]
    assert "duplicate id" in str(pending[1]) and pending[1].id is None
    results.write({"id": "b", "text": "y"})
    results.write({"id": None, "line": 5, "error": "duplicate"})
    results.close()
    assert [(type(p).__name__, p.line) for p in read_items(src, Results(out), None, None)] == [("Item", 6)]


# -- a real `ray start --head` and `ray job submit` ----------------------------------------------


@dataclass
class RayHead:
    gcs: str
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit --address` takes
    metrics: str  # the Prometheus endpoint
    env: dict
    session: int  # the session id of every process of this cluster


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_processes(session: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(proc.name))
    return pids


def kill_session(session: int, grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    logs = tmp_path_factory.mktemp("rayhead")
    # Ray's files: a short folder of its own (its socket paths must fit in 107 bytes; tmp_path's do not)
    temp = Path(tempfile.mkdtemp(prefix="specmoe-job-"))
    gcs, dashboard, metrics, client, agent = free_ports(5)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",  # a token in ~/.ray would otherwise turn token auth on
        "RAY_metrics_report_interval_ms": "1000",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # `python` is this venv's
    }
    command = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
               "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp / "ray"), "--num-cpus", "1",
               # two of each: the batch jobs' deployment and the `serve deploy` test's deployment side by side
               "--resources", json.dumps({"expert_store": 2, "decoder": 2}), "--disable-usage-stats"]
    log = logs / "start.log"
    with open(log, "wb") as out:
        start = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{metrics}/metrics", env,
                   start.pid)
    try:
        assert start.wait(timeout=180) == 0, log.read_text()[-3000:]
        yield head
    finally:
        try:
            stop_jobs(head)
        except OSError:
            pass  # the dashboard is not up: no job runs
        kill_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def write_spec(path: Path, model: Path) -> Path:
    # max_batch_per_decoder=2 < --window: requests wait in the queue, so the batch is really continuous;
    # max_queue=2: a window of more than 4 meets Overloaded, and submits again
    spec = {"name": "batchjob", "namespace": "batchjob", "model": {"path": str(model)},
            "decoders": {"max_batch_size": 2}, "coordinator": {"max_batch_per_decoder": 2, "max_queue": 2}}
    path.write_text(json.dumps(spec))
    return path


def ray_job(head: RayHead, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], env=head.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def submit(head: RayHead, job_id: str, spec: Path, src: Path, out: Path, *extra: str, wait: bool = True):
    deadline = time.monotonic() + 60
    while True:
        done = ray_job(head, "submit", "--address", head.dashboard, "--working-dir", ".", "--submission-id", job_id,
                       *([] if wait else ["--no-wait"]), "--", "python", "-m", "deploy.batch", "--spec", str(spec),
                       "--input", str(src), "--output", str(out), *extra)
        # a head that has just started may not have its job agent up yet
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def job_info(head: RayHead, job_id: str = "") -> dict | list:
    """One job (``status``: PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED; ``driver_info``), or all
    of them: the Jobs REST API of the dashboard."""
    with urllib.request.urlopen(f"{head.dashboard}/api/jobs/{job_id}", timeout=10) as answer:
        return json.loads(answer.read())


def job_status(head: RayHead, job_id: str) -> str:
    return job_info(head, job_id)["status"]


def stop_jobs(head: RayHead) -> None:
    """Stop every job still running (a job's driver runs in a session of its own)."""
    for job in job_info(head):
        if job["status"] in ("PENDING", "RUNNING"):
            ray_job(head, "stop", "--address", head.dashboard, job["submission_id"], timeout=60)


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.cluster
def test_a_killed_batch_job_resumes_and_writes_every_id_once_with_the_engine_tokens(ray_head, tmp_path, shipped_model):
    from specmoe.config import EngineConfig
    from specmoe.engine import Engine, load_tokenizer
    from specmoe.sampling import SamplingParams

    from deploy.serve.protocol import chat_prompt

    texts = PROMPTS * 3
    good = [{"id": f"p{i}", "prompt": p, "max_tokens": TOKENS} for i, p in enumerate(texts)]
    good += [{"id": 100, "messages": CHAT, "max_tokens": TOKENS}, {"id": "stop", "prompt": "ROMEO:", "stop": ["\n\n"]}]
    lines = [json.dumps(g) for g in good]
    lines[3:3] = ['{"id": "hot", "prompt": "ROMEO:", "temperature": -1}', "{not json"]
    lines.append(json.dumps({"id": "p1", "prompt": "again"}))  # a duplicate id
    src, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    spec = write_spec(tmp_path / "spec.json", shipped_model)

    first = submit(ray_head, "batch-first", spec, src, out, "--window", "3", wait=False)
    assert first.returncode == 0, first.stderr[-3000:]
    wait_for(lambda: len(lines_of(out)) >= 4, 240, "the first results")
    os.killpg(os.getpgid(int(job_info(ray_head, "batch-first")["driver_info"]["pid"])), signal.SIGKILL)  # the job's driver
    wait_for(lambda: job_status(ray_head, "batch-first") == "FAILED", 60, "the job to end")
    written = out.read_text()
    assert written.endswith("\n") and 4 <= len(written.splitlines()) < len(lines) // 2, "not killed half-way"
    with open(out, "a") as f:
        f.write('{"id": "p7", "text": "a line cut by a kill')  # as if killed in the middle of a write

    second = submit(ray_head, "batch-second", spec, src, out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    logs = second.stdout + second.stderr
    records = [json.loads(line) for line in lines_of(out)]
    ids = Counter(json.dumps(r["id"]) for r in records if r["id"] is not None)
    assert ids == Counter(json.dumps(i) for i in [g["id"] for g in good] + ["hot"])  # every id exactly once
    by_line = Counter(r["line"] for r in records if r["id"] is None)
    assert by_line == Counter([5, len(lines)])  # bad JSON and the duplicate, once each
    if "hot" not in written:
        assert 'line 4 (id "hot"): temperature must be a finite number >= 0' in logs
    by_id = {r["id"]: r for r in records}
    assert "temperature must be" in by_id["hot"]["error"] and by_id["hot"]["line"] == 4

    tokenizer = load_tokenizer(shipped_model)
    prompts = texts + [chat_prompt(tokenizer, CHAT), "ROMEO:"]
    params = [SamplingParams(max_new_tokens=TOKENS)] * (len(texts) + 1) + [SamplingParams()]
    expected = Engine(EngineConfig(model=str(shipped_model))).generate(prompts, params)
    for g, want in zip(good, expected):
        got = by_id[g["id"]]
        if g["id"] == "stop":
            assert got["finish_reason"] == "stop" and got["text"] == want.text[: want.text.index("\n\n")]
            assert got["token_ids"] == want.token_ids[: len(got["token_ids"])]
            continue
        assert (got["token_ids"], got["text"], got["finish_reason"]) == (want.token_ids, want.text, want.finish_reason)
        assert got["usage"] == {"prompt_tokens": len(want.prompt_token_ids), "completion_tokens": TOKENS,
                                "total_tokens": len(want.prompt_token_ids) + TOKENS}
        assert got["metrics"]["rounds"] >= 1 and got["metrics"]["drafted"] >= got["metrics"]["accepted"]


def scrape(url: str) -> dict[str, float]:
    """Sample name -> the largest value of its series."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.split("{", 1)[0].split(" ", 1)[0], float(line.rsplit(" ", 1)[1])
        samples[name] = max(value, samples.get(name, value))
    return samples


@pytest.mark.cluster
def test_the_metrics_endpoint_shows_every_documented_metric_with_a_value(ray_head, tmp_path, shipped_model):
    from actors.telemetry import METRICS

    wanted = {d.exported + ("_count" if d.kind == "histogram" else ""): d.name for d in METRICS}
    src, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    # gauges are exported once a second with their last value: the job decodes long enough (about
    # ten seconds here) that several exports fall while requests run and wait
    prompts = PROMPTS * 4
    src.write_text("".join(json.dumps({"id": i, "prompt": p, "max_tokens": 48}) + "\n" for i, p in enumerate(prompts)))
    spec = write_spec(tmp_path / "spec.json", shipped_model)
    job = submit(ray_head, "batch-metrics", spec, src, out, wait=False)
    assert job.returncode == 0, job.stderr[-3000:]  # --window 64 meets Overloaded (max_queue=2) and retries
    seen: dict[str, float] = {}

    def all_seen() -> bool:
        if job_status(ray_head, "batch-metrics") in ("FAILED", "STOPPED"):
            logs = ray_job(ray_head, "logs", "--address", ray_head.dashboard, "batch-metrics")
            raise RuntimeError(f"the batch job failed:\n{logs.stdout[-3000:]}")
        for name, value in scrape(ray_head.metrics).items():
            if name in wanted:
                seen[name] = max(value, seen.get(name, 0.0))
        return all(seen.get(name, 0) > 0 for name in wanted)

    try:
        wait_for(all_seen, 180, "every metric", every_s=0.5)
    except AssertionError:
        missing = sorted(wanted[n] for n in wanted if not seen.get(n, 0) > 0)
        raise AssertionError(f"no non-zero value for {missing} (seen: {seen})") from None
    wait_for(lambda: job_status(ray_head, "batch-metrics") not in ("PENDING", "RUNNING"), 180, "the job to end")
    assert job_status(ray_head, "batch-metrics") == "SUCCEEDED"
    assert sorted(json.loads(line)["id"] for line in lines_of(out)) == list(range(len(prompts)))
    text = urllib.request.urlopen(ray_head.metrics, timeout=10).read().decode()
    rejected = [line for line in text.splitlines() if line.startswith("ray_specmoe_requests_total{") and 'outcome="rejected"' in line]
    assert rejected and float(rejected[0].rsplit(" ", 1)[1]) > 0  # the job met Overloaded, and still wrote every id once


def series_sum(url: str, name: str, label: str) -> float:
    """The sum over the series of ``name`` that carry ``label`` (``outcome="abort"``)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


@pytest.mark.cluster
def test_a_stopped_batch_job_aborts_its_requests_in_flight(ray_head, tmp_path, shipped_model):
    src, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p, "max_tokens": 64}) + "\n" for i, p in enumerate(PROMPTS * 3)))
    spec = write_spec(tmp_path / "spec.json", shipped_model)
    aborted = series_sum(ray_head.metrics, "ray_specmoe_requests_total", 'outcome="abort"')
    job = submit(ray_head, "batch-stopped", spec, src, out, "--window", "4", wait=False)
    assert job.returncode == 0, job.stderr[-3000:]
    wait_for(lambda: len(lines_of(out)) >= 1, 240, "the first result")
    stopped = ray_job(ray_head, "stop", "--address", ray_head.dashboard, "batch-stopped")
    assert stopped.returncode == 0 and job_status(ray_head, "batch-stopped") == "STOPPED", stopped.stderr[-3000:]
    assert len(lines_of(out)) < len(PROMPTS) * 3, "the job ended before it was stopped"
    # the coordinator would abort them by itself only after 60 s without a poll
    wait_for(lambda: series_sum(ray_head.metrics, "ray_specmoe_requests_total", 'outcome="abort"') > aborted, 20,
             "the job's requests in flight to be aborted", every_s=0.5)


@pytest.mark.cluster
def test_serve_deploy_of_the_shipped_config_answers_with_the_engine_tokens(ray_head, tmp_path, shipped_model):
    """`serve deploy deploy/serve/config.yaml` (the file as shipped, on another HTTP port and under
    another deployment name) on the real head: the app builds its deployment and answers."""
    import yaml

    from specmoe.config import EngineConfig
    from specmoe.engine import Engine
    from specmoe.sampling import SamplingParams

    config = yaml.safe_load((REPO / "deploy" / "serve" / "config.yaml").read_text())
    (port,) = free_ports(1)
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    spec = config["applications"][0]["args"]["spec"]
    spec.update(name="servedeploy", namespace="servedeploy")
    spec["model"]["path"] = str(shipped_model)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = str(Path(sys.executable).parent / "serve")
    done = subprocess.run([serve, "deploy", "--address", ray_head.dashboard, str(path)], env=ray_head.env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(answers, 240, "the deployed app to answer")
    body = json.dumps({"model": "shakespeare-tiny-moe", "prompt": "ROMEO:", "max_tokens": TOKENS, "temperature": 0})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        got = json.loads(r.read())
    engine = Engine(EngineConfig(model=str(shipped_model)))
    want = engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=TOKENS, ignore_eos=True))[0]
    assert got["usage"]["completion_tokens"] <= TOKENS
    n = got["usage"]["completion_tokens"]
    assert got["choices"][0]["text"] == engine.tokenizer.decode(want.token_ids[:n], skip_special_tokens=True)
    subprocess.run([serve, "shutdown", "--address", ray_head.dashboard, "-y"], env=ray_head.env, cwd=REPO,
                   capture_output=True, timeout=120)
