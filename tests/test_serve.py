"""The OpenAI-compatible Serve app: the official openai client against a real local cluster,
greedy output equal to the client API's, bad HTTP input answered with the right status and
OpenAI's error envelope, and a client that goes away mid-stream freeing its request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy.serve.protocol import DEFAULT_CHAT_TEMPLATE, ApiError, chat_prompt, parse_request

REPO = Path(__file__).resolve().parents[1]
KEY = "serve-test-key"
MODEL = "shakespeare-tiny-moe"
MAX_BODY = 64 << 10


# -- without a cluster -------------------------------------------------------------------------


def test_the_shipped_model_has_no_chat_template_and_gets_the_documented_default(shipped_model):
    from specmoe.engine import load_tokenizer

    tokenizer = load_tokenizer(shipped_model)
    assert not tokenizer.chat_template
    messages = [{"role": "system", "content": "Answer in verse."},
                {"role": "user", "content": "What light through yonder window breaks?", "name": "ROMEO"}]
    assert chat_prompt(tokenizer, messages) == (
        "System:\nAnswer in verse.\n\nROMEO:\nWhat light through yonder window breaks?\n\nAssistant:\n")
    from deploy.serve import app

    assert "System:\n    Answer in verse.\n\n    ROMEO:" in app.__doc__  # the docstring shows what the template makes
    assert DEFAULT_CHAT_TEMPLATE


def test_a_request_maps_to_generation_params_with_openai_defaults():
    r = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                       {"type": "text", "text": "b"}]}],
                               "max_completion_tokens": 7, "top_k": 5, "seed": 3, "stop": "\n", "user": "u",
                               "frequency_penalty": 0.0, "logprobs": False, "n": 1})
    assert r.messages == ({"role": "user", "content": "ab"},)
    p = r.params(7)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (7, 1.0, 1.0, 5, 3, ("\n",))
    r = parse_request("completion", {"model": "m", "prompt": [[1, 2, 3]], "temperature": 0, "stream": True,
                                     "stream_options": {"include_usage": True}})
    assert (r.prompt, r.temperature, r.stream, r.include_usage, r.max_tokens) == ([1, 2, 3], 0.0, True, True, None)


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": "a", "temperature": True}, "temperature"),
    ({"model": "m", "prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": [1, True]}, "prompt"),
    ({"model": "m", "messages": [{"role": "user", "content": "a"}]}, "messages"),  # a chat body on /v1/completions
])
def test_bad_parameters_are_named(body, param):
    with pytest.raises(ApiError) as info:
        parse_request("completion", body)
    assert info.value.status == 400 and info.value.param == param


def test_racing_replicas_attach_instead_of_starting_a_second_set():
    from ray.exceptions import ActorAlreadyExistsError

    from deploy.serve.app import start_or_attach

    calls = []

    def build(spec):  # the first try loses the name race to another replica
        calls.append(spec)
        if len(calls) == 1:
            raise ActorAlreadyExistsError("Actor with name 'specmoe-coordinator' already exists")
        return "attached"

    assert start_or_attach("spec", build) == "attached" and len(calls) == 2

    def always(spec):
        raise ActorAlreadyExistsError("taken")

    with pytest.raises(ActorAlreadyExistsError):
        start_or_attach("spec", always, attempts=2)


def test_the_serve_config_is_a_valid_serve_deploy_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    from deploy.serve.app import INGRESS, IngressConfig

    config = yaml.safe_load((REPO / "deploy" / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "deploy.serve.app:build_app"
    assert app.deployments[0].name == INGRESS and app.deployments[0].autoscaling_config
    ingress = IngressConfig.from_args(config["applications"][0]["args"])
    assert ingress.spec["stores"]["resources"] and ingress.spec["decoders"]["resources"]
    with pytest.raises(ValueError, match="exactly one"):
        IngressConfig.from_args({})
    with pytest.raises(ValueError, match="unknown app args: api"):
        IngressConfig.from_args({"spec": {}, "api": "x"})


def test_specmoe_serve_refuses_a_port_in_use_before_starting_anything(capsys):
    from deploy.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    assert "is in use" in capsys.readouterr().err


# -- on a cluster ------------------------------------------------------------------------------


@pytest.mark.cluster
def test_specmoe_serve_answers_until_ctrl_c(tmp_path):
    """The command people run: its own local cluster and the app, an answer, Ctrl-C, exit 130."""
    import requests

    port, log = free_port(), tmp_path / "serve.log"
    env = os.environ | {"SPECMOE_CACHE": str(tmp_path / "shard-cache")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--port", str(port), "--api-key", "k"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while b"[specmoe] serving" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                          json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError("running 120 s after Ctrl-C:\n" + log.read_text(errors="replace")[-3000:]) from None
        assert code == 130, log.read_text(errors="replace")[-3000:]
        assert "specmoe serve: interrupted" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: the command and the cluster it started
            proc.wait()


@dataclass
class Server:
    url: str
    spec: object
    client: object  # deploy.client.Client of the same deployment
    tokenizer: object

    def post(self, path: str, body=None, data: bytes | None = None, key: str | None = KEY, **kw):
        import requests

        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        if data is None:
            data = json.dumps(body).encode()
        return requests.post(self.url + path, data=data, headers=headers, **({"timeout": 60} | kw))

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict:
        return self.client.metrics()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, shipped_model):
    from ray import serve

    from cluster.deployment import CoordinatorSpec, DecodersSpec, DeploymentSpec, ModelSpec
    from cluster.local import ClusterSpec, LocalCluster
    from deploy.client import connect
    from deploy.serve.app import IngressConfig, SpecMoEIngress
    from specmoe.engine import load_tokenizer

    spec = DeploymentSpec(
        name="serve-test", namespace="tests", model=ModelSpec(path=str(shipped_model)),
        decoders=DecodersSpec(count=1, max_batch_size=4),
        coordinator=CoordinatorSpec(max_queue=2, max_batch_per_decoder=4,
                                    journal=str(tmp_path_factory.mktemp("journal") / "serve.journal")),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECMOE_CACHE", str(tmp_path_factory.mktemp("shard-cache")))
        with LocalCluster(ClusterSpec(stores=1, decoders=1, head_cpus=1, decoder_cpus=1, object_store_mb=200)):
            port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            # two replicas start at once on a cluster with nothing on it: they race to start the deployment
            config = IngressConfig(spec.to_dict(), api_key=KEY, max_body_bytes=MAX_BODY)
            serve.run(SpecMoEIngress.options(num_replicas=2, ray_actor_options={"num_cpus": 0.25}).bind(config),
                      name="specmoe", route_prefix="/")
            client = connect(spec=spec)  # attaches to the coordinator the replicas started
            yield Server(f"http://127.0.0.1:{port}", spec, client, load_tokenizer(shipped_model))
            serve.shutdown()


GREEDY = {"max_tokens": 12, "temperature": 0}


def expected(server: Server, prompt, max_tokens: int = 12, **params):
    from actors.coordinator import GenerationParams

    return server.client.generate([prompt], GenerationParams(max_new_tokens=max_tokens, **params))[0]


@pytest.mark.cluster
def test_two_replicas_share_one_deployment(server):
    import ray
    from ray import serve

    from deploy.serve.app import INGRESS

    ours = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "tests")
    assert ours == ["serve-test-coordinator", "serve-test-decoder-0", "serve-test-store-0"]
    status = serve.status().applications["specmoe"]
    assert status.status == "RUNNING" and status.deployments[INGRESS].replica_states == {"RUNNING": 2}


@pytest.mark.cluster
def test_completions_through_the_openai_client_equal_the_client_api(server):
    want = expected(server, "ROMEO:")
    got = server.openai().completions.create(model=MODEL, prompt="ROMEO:", **GREEDY)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.id.startswith("cmpl-") and got.model == MODEL and got.object == "text_completion"
    prompt_tokens = len(server.tokenizer.encode("ROMEO:", add_special_tokens=False))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, len(want.token_ids))
    assert got.usage.total_tokens == prompt_tokens + len(want.token_ids)
    figures = got.model_extra["specmoe"]
    assert figures["rounds"] >= 1 and 0 <= figures["accepted"] <= figures["drafted"]
    assert figures["tokens_per_round"] == pytest.approx(len(want.token_ids) / figures["rounds"])
    ids = server.tokenizer.encode("ROMEO:", add_special_tokens=False)
    by_ids = server.openai().completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == want.text


@pytest.mark.cluster
def test_streamed_completions_equal_the_client_api_and_end_with_usage(server):
    want = expected(server, "JULIET:")
    chunks = list(server.openai().completions.create(model=MODEL, prompt="JULIET:", stream=True,
                                                     stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert len(chunks) >= 3  # pieces arrive as they are committed, not all at the end
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == want.finish_reason
    assert finals[0].model_extra["specmoe"]["rounds"] >= 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    raw = server.post(CMPL, {"model": MODEL, "prompt": "JULIET:", "stream": True, **GREEDY})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.content.split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]" and all(e.startswith(b"data: {") for e in events[:-1])


@pytest.mark.cluster
def test_chat_through_the_openai_client_equals_the_client_api_on_the_rendered_prompt(server):
    messages = [{"role": "system", "content": "Speak as a king."}, {"role": "user", "content": "Who goes there?"}]
    want = expected(server, chat_prompt(server.tokenizer, messages))
    got = server.openai().chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12,
                                                  temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.id.startswith("chatcmpl-") and got.usage.completion_tokens == len(want.token_ids)
    stream = server.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                     stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason and "specmoe" in chunks[-1].model_extra


@pytest.mark.cluster
def test_stop_strings_and_sampling_parameters_reach_the_coordinator(server):
    want = expected(server, "ROMEO:", 24, stop=("e",))
    got = server.openai().completions.create(model=MODEL, prompt="ROMEO:", max_tokens=24, temperature=0, stop=["e"])
    assert got.choices[0].text == want.text and "e" not in got.choices[0].text
    assert got.choices[0].finish_reason == "stop"
    sampled = server.openai().completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=1.0,
                                                 top_p=0.9, seed=7, extra_body={"top_k": 20})
    assert sampled.usage.completion_tokens >= 1 and sampled.choices[0].finish_reason in ("stop", "length")


@pytest.mark.cluster
def test_models_and_health(server):
    import requests

    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].model_extra["max_model_len"] == 512
    assert requests.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    assert requests.get(server.url + "/v1/models", timeout=30).status_code == 401


LONG = "ROMEO: " * 400  # over the shipped model's 512 positions
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
OK = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 4, "temperature": 0}
MSG = [{"role": "user", "content": "Hi"}]

BAD = [  # (id, path, body | raw bytes, headers key, status, param)
    ("missing model", CMPL, {"prompt": "a"}, KEY, 400, "model"),
    ("missing prompt", CMPL, {"model": MODEL}, KEY, 400, "prompt"),
    ("missing messages", CHAT, {"model": MODEL}, KEY, 400, "messages"),
    ("prompt of a wrong type", CMPL, OK | {"prompt": 5}, KEY, 400, "prompt"),
    ("model of a wrong type", CMPL, OK | {"model": 3}, KEY, 400, "model"),
    ("negative max_tokens", CMPL, OK | {"max_tokens": -1}, KEY, 400, "max_tokens"),
    ("max_tokens as a string", CMPL, OK | {"max_tokens": "10"}, KEY, 400, "max_tokens"),
    ("temperature above 2", CMPL, OK | {"temperature": 2.5}, KEY, 400, "temperature"),
    ("negative temperature", CHAT, {"model": MODEL, "messages": MSG, "temperature": -0.1}, KEY, 400, "temperature"),
    ("top_p of 0", CMPL, OK | {"top_p": 0}, KEY, 400, "top_p"),
    ("negative top_k", CMPL, OK | {"top_k": -5}, KEY, 400, "top_k"),
    ("seed as a float", CMPL, OK | {"seed": 1.5}, KEY, 400, "seed"),
    ("n of 2", CMPL, OK | {"n": 2}, KEY, 400, "n"),
    ("five stop strings", CMPL, OK | {"stop": ["a", "b", "c", "d", "e"]}, KEY, 400, "stop"),
    ("stop of a wrong type", CMPL, OK | {"stop": 7}, KEY, 400, "stop"),
    ("stream not a boolean", CMPL, OK | {"stream": "yes"}, KEY, 400, "stream"),
    ("stream_options without stream", CMPL, OK | {"stream_options": {"include_usage": True}}, KEY, 400, "stream_options"),
    ("unknown parameter", CMPL, OK | {"frobnicate": 1}, KEY, 400, "frobnicate"),
    ("unsupported logprobs", CMPL, OK | {"logprobs": 5}, KEY, 400, "logprobs"),
    ("two prompts", CMPL, OK | {"prompt": ["a", "b"]}, KEY, 400, "prompt"),
    ("token id outside the vocabulary", CMPL, OK | {"prompt": [1, 99999]}, KEY, 400, "prompt"),
    ("unknown model", CMPL, OK | {"model": "gpt-4"}, KEY, 404, "model"),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, KEY, 400, "messages"),
    ("message with an unknown role", CHAT, {"model": MODEL, "messages": [{"role": "king", "content": "x"}]}, KEY, 400,
     "messages[0].role"),
    ("message without content", CHAT, {"model": MODEL, "messages": [{"role": "user"}]}, KEY, 400, "messages[0].content"),
    ("oversized prompt", CMPL, OK | {"prompt": LONG}, KEY, 400, "prompt"),
    ("max_tokens past the context", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 100000}, KEY, 400, "messages"),
    ("malformed JSON", CMPL, b'{"model": "shakespeare-tiny-moe", "prompt": ', KEY, 400, None),
    ("a JSON array body", CMPL, b"[1, 2]", KEY, 400, None),
    ("an empty body", CHAT, b"", KEY, 400, None),
    ("a body that is not UTF-8", CMPL, b'{"model": "\xff\xfe", "prompt": "a"}', KEY, 400, None),
    ("a huge body", CMPL, json.dumps(OK | {"prompt": "a" * (2 * MAX_BODY)}).encode(), KEY, 413, None),
    ("a wrong API key", CMPL, OK, "not-the-key", 401, None),
    ("no API key", CHAT, {"model": MODEL, "messages": MSG}, None, 401, None),
]


@pytest.mark.cluster
@pytest.mark.parametrize("path, body, key, status, param", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_gets_its_status_and_the_openai_error_envelope(server, path, body, key, status, param):
    raw = body if isinstance(body, bytes) else None
    r = server.post(path, None if raw is not None else body, data=raw, key=key)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    if "context" in r.text:
        assert error["code"] == "context_length_exceeded"


@pytest.mark.cluster
def test_unknown_routes_and_methods_get_the_envelope_too(server):
    import requests

    for r, status in [(requests.get(server.url + "/v1/nothing", timeout=30), 404),
                      (requests.get(server.url + CMPL, timeout=30), 405)]:
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.cluster
def test_the_server_still_answers_after_bad_input(server):
    r = server.post(CMPL, OK)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected(server, "ROMEO:", 4).text


@pytest.mark.cluster
def test_a_full_queue_is_a_429_with_retry_after(server):
    from actors.coordinator import GenerationParams

    busy = GenerationParams(max_new_tokens=400, ignore_eos=True)
    ids = []
    try:
        r = None
        for _ in range(12):  # 4 run on the decoder, 2 wait (max_queue), the next is refused
            try:
                ids.append(server.client.submit("ROMEO:", busy))
            except Exception:
                break
        r = server.post(CMPL, OK)
    finally:
        for rid in ids:
            server.client.abort(rid)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


@pytest.mark.cluster
def test_a_client_that_disconnects_mid_stream_aborts_its_request(server):
    before = server.metrics()["aborted"]
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 480, "temperature": 0, "stream": True, "ignore_eos": True}
    r = server.post(CMPL, body, stream=True)
    lines = r.iter_lines()
    first = next(line for line in lines if line)
    assert first.startswith(b"data: {")
    r.close()  # hang up
    assert wait_for_abort(server, before) == before + 1


def wait_for_abort(server: Server, before: int) -> int:
    """The coordinator's aborted count once nothing runs any more (well within its own 60 s reaper)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["aborted"] > before and m["running"] == 0 and m["queued"] == 0:
            break
        time.sleep(0.2)
    return m["aborted"]


@pytest.mark.cluster
def test_a_client_that_gives_up_on_a_plain_request_aborts_it(server):
    import requests

    before = server.metrics()["aborted"]
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(requests.exceptions.ReadTimeout):
        server.post(CMPL, body, timeout=0.3)
    assert wait_for_abort(server, before) == before + 1
