"""The service end to end on a real local multi-node Ray cluster, through ``specmoe.connect()``.

One cluster for the module: a head, one store node, two decoder nodes; the shipped model in
specmoe mode; the coordinator batching over both decoders. Every greedy output is compared,
token for token, with the single-process engine's (resident experts, no speculation).
Tests run in file order and leave the deployment idle; the decoder-kill test comes late
because it leaves one decoder.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import ray

import specmoe
from actors.coordinator import GenerationParams, Overloaded
from cluster.deployment import CoordinatorSpec, DecodersSpec, DeploymentSpec, ModelSpec
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams
from tests.conftest import REPO, SHIPPED_MODEL

pytestmark = pytest.mark.cluster

NAMES = ["ROMEO", "JULIET", "First Citizen", "MENENIUS", "KING RICHARD III", "QUEEN ELIZABETH", "GLOUCESTER", "BRUTUS"]
PROMPTS = [f"{name}:" + " O" * (i % 3) for i, name in enumerate(NAMES * 4)]  # 32 prompts, 2..19 tokens
LENGTHS = [4 + (7 * i) % 21 for i in range(32)]  # 4..24 new tokens


@pytest.fixture(scope="module")
def client():
    spec = DeploymentSpec(
        model=ModelSpec(path=str(SHIPPED_MODEL)),
        decoders=DecodersSpec(count=2, max_batch_size=8, config=DecoderConfig(mode="specmoe")),
        coordinator=CoordinatorSpec(max_queue=24, max_batch_per_decoder=8),
    )
    c = specmoe.connect(spec=spec)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of the single-process engine (resident, no speculation), cached per (prompt, n)."""
    engine = Engine(EngineConfig(model=str(SHIPPED_MODEL), max_batch_size=16, decoder=DecoderConfig(mode="resident")))
    cache = {}

    def tokens(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            cache[(prompt, n)] = engine.generate([prompt], SamplingParams(max_new_tokens=n))[0].token_ids
        return cache[(prompt, n)]

    tokens.tokenizer = engine.tokenizer
    return tokens


def stream_all(client, prompts, params, on_piece=None) -> list[list]:
    """Stream every prompt on its own thread; each stream's pieces, in arrival order."""
    out = [[] for _ in prompts]
    errors = []

    def run(i):
        try:
            for piece in client.stream(prompts[i], params[i]):
                out[i].append(piece)
                if on_piece is not None:
                    on_piece(i, piece)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert all(p and p[-1].finished for p in out), "a stream did not finish"
    return out


def when_all_started(count: int, action):
    """An ``on_piece`` callback that runs ``action`` once, when each of ``count`` streams has
    received tokens: every request then has committed tokens, none has finished."""
    started, lock, fired = set(), threading.Lock(), threading.Event()

    def on_piece(i, piece):
        with lock:
            if piece.token_ids:
                started.add(i)
            if len(started) == count and not fired.is_set():
                fired.set()
                action()

    on_piece.fired = fired
    return on_piece


def assert_exactly_once(pieces, want_tokens, tokenizer):
    """Concatenated pieces are the reference: no token (or character) duplicated or missing."""
    assert sum((p.token_ids for p in pieces), []) == want_tokens
    assert "".join(p.text for p in pieces) == tokenizer.decode(want_tokens, skip_special_tokens=True)


def wait_idle(client, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        m = client.metrics()
        if (m["queued"] == 0 and m["running"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_32_concurrent_requests_of_different_lengths_and_params_all_complete_and_greedy_ones_equal_the_engine(client, reference):
    params = []
    for i, n in enumerate(LENGTHS):
        if i % 4 == 3:  # sampled: temperature, top-p, top-k, seed
            params.append(GenerationParams(max_new_tokens=n, temperature=0.8, top_p=0.9, top_k=20, seed=i, ignore_eos=True))
        elif i % 8 == 1:  # greedy with a stop string
            params.append(GenerationParams(max_new_tokens=n, stop=["\n\n"]))
        else:
            params.append(GenerationParams(max_new_tokens=n))
    done = client.generate(PROMPTS, params)
    for prompt, p, c in zip(PROMPTS, params, done):
        if p.greedy:
            want = reference(prompt, p.max_new_tokens)
            text = reference.tokenizer.decode(want, skip_special_tokens=True)
            if p.stop and "\n\n" in text:
                assert c.text == text[: text.index("\n\n")] and c.finish_reason == "stop"
                assert want[: len(c.token_ids)] == c.token_ids
            else:
                assert c.token_ids == want, prompt
                assert c.text == text
        else:
            assert len(c.token_ids) == p.max_new_tokens and c.finish_reason == "length"
        assert c.metrics["output_tokens"] == len(c.token_ids)
        assert c.metrics["rounds"] >= 1 and c.metrics["accepted"] <= c.metrics["drafted"]
    assert sum(c.metrics["drafted"] for c in done) > 0  # the decoders speculated
    m = wait_idle(client)
    assert all(d["rounds"] > 0 for d in m["decoders"])  # both decoders served


def test_streaming_is_incremental_in_order_and_exactly_once(client, reference):
    [pieces] = stream_all(client, ["ROMEO:"], [GenerationParams(max_new_tokens=40, ignore_eos=True)])
    # tokens arrive round by round, before the end: 40 tokens take at least 4 rounds at k_max = 16
    # (the prefill's token, then at most 17 a round), and a slow poll may carry two rounds
    assert len(pieces) >= 3 and not pieces[0].finished
    assert_exactly_once(pieces, reference("ROMEO:", 40), reference.tokenizer)
    assert pieces[-1].metrics["output_tokens"] == 40


def test_cancelling_a_request_frees_its_slot_for_a_queued_one(client, reference):
    slots = sum(1 for d in client.metrics()["decoders"] if d["live"]) * 8
    long_ids = [client.submit("MENENIUS:", GenerationParams(max_new_tokens=200, ignore_eos=True)) for _ in range(slots)]
    queued = client.submit("JULIET:", GenerationParams(max_new_tokens=6))
    try:
        assert client.metrics()["queued"] == 1
        time.sleep(0.5)
        assert client.metrics()["queued"] == 1  # still waiting: every slot is busy
        client.abort(long_ids[0])
        deadline = time.monotonic() + 30
        while client.metrics()["queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.metrics()["queued"] == 0  # the freed slot went to the queued request
        [done] = client.wait([queued])  # runs now, while the other long ones still hold their slots
        assert done.token_ids == reference("JULIET:", 6)
        assert client.metrics()["running"] == slots - 1
    finally:
        for rid in long_ids:
            client.abort(rid)
    wait_idle(client)


def test_a_stream_closed_early_aborts_its_request(client):
    stream = client.stream("ROMEO:", GenerationParams(max_new_tokens=200, ignore_eos=True))
    first = next(stream)
    stream.close()  # the client goes away
    held = ray.get(client.coordinator.result.remote(first.request_id))
    assert held.finished and held.finish_reason == "abort" and len(held.token_ids) < 200
    wait_idle(client)


def test_killing_an_expert_store_mid_generation_loses_no_token(client, reference):
    store = client.deployment.stores.handles[0]
    prompts = PROMPTS[:6]
    met_before = sum(m["refreshes"] + m["transport"]["failovers"] for m in client.decoder_metrics())
    # restarted by Ray: it loads and publishes its experts again
    kill = when_all_started(len(prompts), lambda: ray.kill(store, no_restart=False))
    # long enough that rounds after the kill still fetch (with k up to 8, 32 tokens could end first)
    params = [GenerationParams(max_new_tokens=96, ignore_eos=True)] * len(prompts)
    out = stream_all(client, prompts, params, kill)
    assert kill.fired.is_set()
    for prompt, pieces in zip(prompts, out):
        assert_exactly_once(pieces, reference(prompt, 96), reference.tokenizer)
    wait_idle(client)
    # the decoders did meet the dead store: their source re-asked the restarted store (a failover),
    # or, while it was still restarting, a round failed and the decoder refreshed its source
    met = [m["refreshes"] + m["transport"]["failovers"] for m in client.decoder_metrics()]
    assert sum(met) > met_before, met


def test_restarting_the_coordinator_resumes_requests_from_the_journal(client, reference):
    coordinator = client.coordinator
    prompts = PROMPTS[6:11]
    kill = when_all_started(len(prompts), lambda: ray.kill(coordinator, no_restart=False))
    greedy = GenerationParams(max_new_tokens=40, ignore_eos=True)
    sampled = GenerationParams(max_new_tokens=40, ignore_eos=True, temperature=1.0)  # unseeded: never drawn twice alike
    out = stream_all(client, prompts, [greedy] * 4 + [sampled], kill)
    assert kill.fired.is_set()
    for prompt, pieces in zip(prompts[:4], out):
        assert_exactly_once(pieces, reference(prompt, 40), reference.tokenizer)  # streams reconnected with their cursor
    for pieces in out:  # each resumed from its committed tokens, and the client saw exactly what the coordinator holds
        held = ray.get(client.coordinator.result.remote(pieces[0].request_id))
        assert sum((p.token_ids for p in pieces), []) == held.token_ids and len(held.token_ids) == 40
    # a request may finish in the moment between the kill and the old process's end: not every one is resumed
    readmitted = [pieces[-1].metrics["readmitted"] for pieces in out]
    assert max(readmitted) == 1 and set(readmitted) <= {0, 1}  # resumed once, never twice
    m = wait_idle(client)
    assert m["incarnation"] == 1  # a new coordinator, which read the journal
    assert sum(d["running"] for d in m["decoders"]) == 0


def test_a_full_queue_raises_overloaded_and_the_service_keeps_serving(client, reference):
    params = GenerationParams(max_new_tokens=8)
    admitted = []  # (request id, prompt)
    with pytest.raises(Overloaded):
        for i in range(200):
            admitted.append((client.submit(PROMPTS[i % 32], params), PROMPTS[i % 32]))
    # as raised by the actor itself, through Ray's wrapping (a loop: between two submits a
    # decoder may have taken a queued request, and the queue has room for one more)
    with pytest.raises(Overloaded):
        for i in range(200):
            request_id = ray.get(client.coordinator.submit.remote(f"direct-{i}", "ROMEO:", params))
            admitted.append((request_id, "ROMEO:"))
    done = client.wait([request_id for request_id, _ in admitted])  # everyone admitted is served
    for (_, prompt), c in zip(admitted, done):
        assert c.token_ids == reference(prompt, 8)
    assert client.generate(["JULIET:"], params)[0].token_ids == reference("JULIET:", 8)


def test_another_process_connects_by_address_to_the_same_coordinator(client, reference):
    code = ("import specmoe; from deploy.client import GenerationParams; "
            f"c = specmoe.connect({client.cluster.address!r}); "
            "print(c.generate(['JULIET:'], GenerationParams(max_new_tokens=12))[0].token_ids); c.close()")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(reference("JULIET:", 12))
    assert client.metrics()["submitted"] >= 1  # served by this deployment's coordinator


def kill_decoder_mid_generation(client, reference, index: int, prompts, tokens: int, restart: bool) -> dict:
    """Stream ``prompts``, kill decoder ``index`` once every stream has tokens; every stream must
    still equal the engine's, exactly once. Returns the coordinator's metrics once idle."""
    decoder = client.deployment.decoders[index]
    kill = when_all_started(len(prompts), lambda: ray.kill(decoder, no_restart=not restart))
    out = stream_all(client, prompts, [GenerationParams(max_new_tokens=tokens, ignore_eos=True)] * len(prompts), kill)
    assert kill.fired.is_set()
    for prompt, pieces in zip(prompts, out):
        assert_exactly_once(pieces, reference(prompt, tokens), reference.tokenizer)
    return wait_idle(client)


def test_killing_a_decoder_mid_generation_loses_no_token(client, reference):
    m = kill_decoder_mid_generation(client, reference, 0, PROMPTS[10:18], 40, restart=False)
    assert m["readmitted"] >= 1 and not m["decoders"][0]["live"] and m["decoders"][1]["live"]


def test_a_crashed_decoder_is_restarted_by_ray_and_serves_again(client, reference):
    """The last live decoder crashes (decoders.max_restarts: Ray restarts it, empty): its requests
    wait in the queue until the coordinator's probe finds it alive again, then finish exactly."""
    m = kill_decoder_mid_generation(client, reference, 1, PROMPTS[18:22], 24, restart=True)
    assert m["decoders"][1]["live"] and m["readmitted"] >= 1


def test_the_cli_demo_goes_through_the_service_and_prints_the_resident_text(client, capsys):
    from deploy.cli import main

    args = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "16"]
    assert main(args + ["--mode", "specmoe", "--experts", "ray"]) == 0  # joins this cluster's coordinator
    service = capsys.readouterr()
    assert main(args + ["--mode", "resident"]) == 0
    resident = capsys.readouterr()
    assert service.out == resident.out and service.out.strip()
    assert "time_to_first_token_s" in service.err and "expert_bytes_moved" in service.err
