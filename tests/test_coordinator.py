"""The coordinator's logic against fake decoders: no cluster, no model (only its tokenizer).

Fake decoders (tests/mocks/fake_decoder.py) produce a deterministic continuation, like greedy
decoding, so every test states the exact tokens each request must end with.
"""

from __future__ import annotations

import asyncio

import pytest

from actors.coordinator import Coordinator, GenerationParams, Journal, Overloaded
from cluster.deployment import CoordinatorSpec
from specmoe.engine import load_tokenizer
from tests.conftest import SHIPPED_MODEL
from tests.mocks.fake_decoder import FakeDecoder, FakeHandle, letter_script


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED_MODEL)


def expected(prompt: list[int], n: int, script=letter_script) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(script(tokens))
    return tokens[len(prompt):]


def make(tokenizer, fakes, tmp_path, **spec) -> Coordinator:
    handles = [FakeHandle(f) for f in fakes]
    spec = CoordinatorSpec(**({"journal": str(tmp_path / "journal")} | spec))
    return Coordinator(handles, spec, str(SHIPPED_MODEL), tokenizer=tokenizer, retry_s=0.001, probe_s=0.01)


async def stream(coord: Coordinator, rid: str, timeout_s: float = 10.0) -> tuple[list[list[int]], list[str], object]:
    """Poll one request to the end: its token pieces, its text pieces, the last chunk."""
    pieces, texts, seen, chars = [], [], 0, 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        chunk = (await coord.poll({rid: (seen, chars)}, 0.5))[rid]
        if chunk.token_ids:
            pieces.append(chunk.token_ids)
        if chunk.text:
            texts.append(chunk.text)
        seen, chars = seen + len(chunk.token_ids), chars + len(chunk.text)
        if chunk.finished:
            return pieces, texts, chunk
    raise TimeoutError(f"request {rid} did not finish")


async def run_all(coord: Coordinator, ids: list[str]) -> dict:
    results = await asyncio.gather(*(stream(coord, rid) for rid in ids))
    return dict(zip(ids, results))


PROMPTS = {f"r{i}": [40 + i, 70 + i, 80] for i in range(6)}


def test_requests_go_to_the_decoder_with_fewest_outstanding_tokens_at_most_a_batch_each(tokenizer, tmp_path):
    fakes = [FakeDecoder(), FakeDecoder()]

    async def main():
        coord = make(tokenizer, fakes, tmp_path, max_batch_per_decoder=2)
        lengths = {"r0": 10, "r1": 2, "r2": 5, "r3": 3, "r4": 1}
        for rid, n in lengths.items():
            await coord.submit(rid, PROMPTS[rid], GenerationParams(max_new_tokens=n))
        placed = {rid: coord.requests[rid].decoder for rid in lengths}
        queued = [r.id for r in coord.queue]
        out = await run_all(coord, list(lengths))
        return placed, queued, out, lengths

    placed, queued, out, lengths = asyncio.run(main())
    # r0 -> d0 (tie, lower index); r1 -> d1 (0 < 10); r2 -> d1 (2 < 10); r3 -> d0 (d1 full); r4 waits
    assert placed == {"r0": 0, "r1": 1, "r2": 1, "r3": 0, "r4": None}
    assert queued == ["r4"]
    for rid, (pieces, _, last) in out.items():
        assert sum(pieces, []) == expected(PROMPTS[rid], lengths[rid])
        assert last.finish_reason == "length"
    assert all(max(f.batch_sizes) <= 2 for f in fakes)


def test_each_decoder_has_one_call_in_flight_and_decoders_step_concurrently(tokenizer, tmp_path):
    fakes = [FakeDecoder(), FakeDecoder()]
    shared = {"steps": 0, "max": 0}

    class Counting(FakeHandle):
        async def _run(self, name, args):
            shared["steps"] += name == "step"
            shared["max"] = max(shared["max"], shared["steps"])
            try:
                return await super()._run(name, args)
            finally:
                shared["steps"] -= name == "step"

    async def main():
        spec = CoordinatorSpec(journal=str(tmp_path / "j"), max_batch_per_decoder=4)
        handles = [Counting(f, latency_s=0.01) for f in fakes]
        coord = Coordinator(handles, spec, str(SHIPPED_MODEL), tokenizer=tokenizer)
        for rid in PROMPTS:
            await coord.submit(rid, PROMPTS[rid], GenerationParams(max_new_tokens=12))
        await run_all(coord, list(PROMPTS))
        return handles

    handles = asyncio.run(main())
    assert [h.max_in_flight for h in handles] == [1, 1]
    assert shared["max"] == 2


def test_a_full_queue_raises_overloaded_and_the_others_are_still_served(tokenizer, tmp_path):
    async def main():
        coord = make(tokenizer, [FakeDecoder()], tmp_path, max_batch_per_decoder=1, max_queue=2)
        for rid in ["r0", "r1", "r2"]:  # one running, two queued
            await coord.submit(rid, PROMPTS[rid], GenerationParams(max_new_tokens=4))
        with pytest.raises(Overloaded, match="max_queue=2"):
            await coord.submit("r3", PROMPTS["r3"], GenerationParams(max_new_tokens=4))
        out = await run_all(coord, ["r0", "r1", "r2"])
        await coord.submit("r3", PROMPTS["r3"], GenerationParams(max_new_tokens=4))  # room again
        out |= await run_all(coord, ["r3"])
        return out, await coord.metrics()

    out, metrics = asyncio.run(main())
    for rid, (pieces, _, last) in out.items():
        assert sum(pieces, []) == expected(PROMPTS[rid], 4) and last.finish_reason == "length"
    assert metrics["rejected"] == 1 and metrics["finished"] == 4


def test_streaming_is_incremental_in_order_exactly_once_and_a_cursor_can_be_replayed(tokenizer, tmp_path):
    async def main():
        coord = make(tokenizer, [FakeDecoder()], tmp_path)
        await coord.submit("r0", PROMPTS["r0"], GenerationParams(max_new_tokens=20))
        first = (await coord.poll({"r0": (0, 0)}, 5.0))["r0"]
        again = (await coord.poll({"r0": (0, 0)}, 5.0))["r0"]  # a client that lost the answer asks again
        pieces, texts, last = await stream(coord, "r0")
        return first, again, pieces, texts, last

    first, again, pieces, texts, last = asyncio.run(main())
    want = expected(PROMPTS["r0"], 20)
    assert again.token_ids[: len(first.token_ids)] == first.token_ids
    assert len(pieces) > 3  # incremental: many rounds, each a piece
    assert sum(pieces, []) == want
    assert "".join(texts) == tokenizer.decode(want)
    assert last.metrics["output_tokens"] == 20 and last.metrics["rounds"] == len(pieces)
    assert last.metrics["accepted"] == 20 - last.metrics["rounds"]  # each round: accepted + 1 bonus


def test_abort_frees_the_slot_for_a_queued_request(tokenizer, tmp_path):
    fake = FakeDecoder()

    async def main():
        coord = make(tokenizer, [fake], tmp_path, max_batch_per_decoder=1)
        await coord.submit("long", PROMPTS["r0"], GenerationParams(max_new_tokens=900))
        await coord.submit("next", PROMPTS["r1"], GenerationParams(max_new_tokens=5))
        await coord.poll({"long": (0, 0)}, 5.0)
        key = coord.requests["long"].key
        await coord.abort("long")
        out = await run_all(coord, ["long", "next"])
        await asyncio.sleep(0.05)
        return out, key

    out, key = asyncio.run(main())
    assert out["long"][2].finish_reason == "abort"
    assert sum(out["next"][0], []) == expected(PROMPTS["r1"], 5)
    assert ("abort", key) in fake.calls and key not in fake.seqs


def test_a_client_that_stops_polling_is_aborted_and_its_slot_freed(tokenizer, tmp_path):
    async def main():
        spec = CoordinatorSpec(journal=str(tmp_path / "j"), max_batch_per_decoder=1)
        coord = Coordinator([FakeHandle(FakeDecoder())], spec, str(SHIPPED_MODEL), tokenizer=tokenizer, client_timeout_s=0.3)
        await coord.submit("gone", PROMPTS["r0"], GenerationParams(max_new_tokens=900))
        await coord.submit("here", PROMPTS["r1"], GenerationParams(max_new_tokens=5))
        out = await run_all(coord, ["here"])  # only "here" is polled
        return out, coord.requests["gone"]

    out, gone = asyncio.run(main())
    assert sum(out["here"][0], []) == expected(PROMPTS["r1"], 5)
    assert gone.finish_reason == "abort" and gone.error == "the client went away"


def test_stop_strings_cut_the_text_and_abort_the_request_on_its_decoder(tokenizer, tmp_path):
    text_ids = tokenizer.encode("to be, or not to be: that is", add_special_tokens=False)
    prompt = tokenizer.encode("HAMLET:", add_special_tokens=False)

    def script(tokens):
        return text_ids[(len(tokens) - len(prompt)) % len(text_ids)]

    fake = FakeDecoder(script=script)

    async def main():
        coord = make(tokenizer, [fake], tmp_path)
        await coord.submit("r", prompt, GenerationParams(max_new_tokens=60, stop=["not to", "that"]))
        out = await stream(coord, "r")
        await asyncio.sleep(0.05)  # the abort goes out at the decoder's next round boundary
        return out

    pieces, texts, last = asyncio.run(main())
    tokens = sum(pieces, [])
    assert "".join(texts) == "to be, or "  # nothing of the stop string ever streamed
    assert tokenizer.decode(tokens) == "to be, or not to"  # ends with the token that completed it
    assert last.finish_reason == "stop"
    assert any(c[0] == "abort" for c in fake.calls) and not fake.seqs


def test_stop_token_ids_and_params_reach_the_decoder(tokenizer, tmp_path):
    fake = FakeDecoder()
    want = expected(PROMPTS["r2"], 30)
    stop_token = want[6]

    async def main():
        coord = make(tokenizer, [fake], tmp_path)
        await coord.submit("r", PROMPTS["r2"], GenerationParams(max_new_tokens=30, stop_token_ids=[stop_token]))
        return await stream(coord, "r")

    pieces, _, last = asyncio.run(main())
    assert sum(pieces, []) == want[: want.index(stop_token) + 1] and last.finish_reason == "stop"


@pytest.mark.parametrize("death", ["actor_died", "decoder_dead"])
def test_a_dead_decoders_requests_move_to_a_live_one_without_a_duplicate_or_missing_token(tokenizer, tmp_path, death):
    fakes = [FakeDecoder(die_at_round=4, dead_error=death == "decoder_dead"), FakeDecoder()]

    async def main():
        coord = make(tokenizer, fakes, tmp_path, max_batch_per_decoder=8)
        for rid in PROMPTS:
            await coord.submit(rid, PROMPTS[rid], GenerationParams(max_new_tokens=25))
        out = await run_all(coord, list(PROMPTS))
        return out, await coord.metrics()

    out, metrics = asyncio.run(main())
    for rid, (pieces, texts, last) in out.items():
        assert sum(pieces, []) == expected(PROMPTS[rid], 25), rid
        assert "".join(texts) == tokenizer.decode(expected(PROMPTS[rid], 25))
        assert last.finish_reason == "length"
    assert metrics["readmitted"] == 3 and not metrics["decoders"][0]["live"]
    moved = [c for c in fakes[1].calls if c[0] == "add" and c[2] > 3]  # re-admitted with committed tokens
    assert len(moved) == 3 and all(n + m - 3 == 25 for _, _, n, m in moved)  # remaining max tokens


def test_failed_rounds_are_retried_and_too_many_in_a_row_declare_the_decoder_dead(tokenizer, tmp_path):
    flaky = FakeDecoder(fail_rounds={2, 3})  # two failures in a row: retried, stays live
    broken = FakeDecoder(fail_rounds=set(range(2, 100)))  # fails forever: dead after 3

    async def main():
        coord = make(tokenizer, [flaky, broken, FakeDecoder()], tmp_path, decoder_failures=3, max_batch_per_decoder=2)
        for rid in PROMPTS:
            await coord.submit(rid, PROMPTS[rid], GenerationParams(max_new_tokens=15))
        out = await run_all(coord, list(PROMPTS))
        return out, await coord.metrics()

    out, metrics = asyncio.run(main())
    for rid, (pieces, _, _) in out.items():
        assert sum(pieces, []) == expected(PROMPTS[rid], 15)
    live = [d["live"] for d in metrics["decoders"]]
    assert live[0] and live[2] and metrics["readmitted"] == 2
    assert not broken.seqs  # the probe aborted its stale copies


def test_journal_drops_a_torn_last_record(tmp_path):
    path = tmp_path / "journal"
    journal = Journal(path)
    journal.rewrite([{"op": "submit", "id": "a", "prompt": [1], "params": {}}])
    journal.append({"op": "commit", "id": "a", "tokens": [5, 6], "drafted": 2, "accepted": 1})
    journal.close()
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"\x85\xa2op\xa6commit\xa2id")  # a record cut mid-write
    assert Journal(path).replay() == [
        {"op": "submit", "id": "a", "prompt": [1], "params": {}},
        {"op": "commit", "id": "a", "tokens": [5, 6], "drafted": 2, "accepted": 1},
    ]
    assert path.read_bytes() == whole  # the torn tail is cut off


def test_a_restarted_coordinator_resumes_from_the_journal_and_drops_stale_copies(tokenizer, tmp_path):
    fakes = [FakeDecoder(), FakeDecoder()]
    lengths = {rid: 20 + 3 * i for i, rid in enumerate(PROMPTS)}

    async def first_life():
        coord = make(tokenizer, fakes, tmp_path, max_batch_per_decoder=2)
        for rid in PROMPTS:
            await coord.submit(rid, PROMPTS[rid], GenerationParams(max_new_tokens=lengths[rid], stop=["zzzz"]))
        seen = {}
        for rid in list(PROMPTS)[:2]:  # two clients read part of their streams
            chunk = (await coord.poll({rid: (0, 0)}, 5.0))[rid]
            seen[rid] = (chunk.token_ids, chunk.text)
        coord.shutdown()  # the process dies: tasks stop, decoders keep their copies
        return seen, {rid: list(r.tokens) for rid, r in coord.requests.items()}

    seen, committed = asyncio.run(first_life())
    with open(tmp_path / "journal", "ab") as f:
        f.write(b"\x85\xa2op")  # and it died mid-record
    stale = {key for f in fakes for key in f.seqs}
    assert stale

    async def second_life():
        coord = make(tokenizer, fakes, tmp_path, max_batch_per_decoder=2)
        resumed = {rid: list(r.tokens) for rid, r in coord.requests.items()}
        out = {}
        for rid in PROMPTS:
            toks, text = seen.get(rid, ([], ""))
            out[rid] = await stream_from(coord, rid, len(toks), len(text))
        return resumed, out, coord.incarnation

    async def stream_from(coord, rid, seen_tokens, seen_chars):
        pieces, chars = [], seen_chars
        while True:
            chunk = (await coord.poll({rid: (seen_tokens, chars)}, 1.0))[rid]
            pieces.append(chunk.token_ids)
            seen_tokens, chars = seen_tokens + len(chunk.token_ids), chars + len(chunk.text)
            if chunk.finished:
                return sum(pieces, []), chunk

    resumed, out, incarnation = asyncio.run(second_life())
    assert resumed == committed  # every committed token survived
    assert incarnation == 1
    for rid in PROMPTS:
        before = seen.get(rid, ([], ""))[0]
        tokens, last = out[rid]
        assert before + tokens == expected(PROMPTS[rid], lengths[rid]), rid  # no duplicate, none missing
        assert last.finish_reason == "length"
    aborted = {c[1] for f in fakes for c in f.calls if c[0] == "abort"}
    assert stale <= aborted and not any(key in f.seqs for f in fakes for key in stale)  # stale copies aborted


def test_user_mistakes_raise_value_error_naming_the_value(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings, got"):
        GenerationParams(stop=["ok", ""])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        GenerationParams(max_new_tokens=0)
    assert GenerationParams(stop="\n").stop == ("\n",)

    async def main():
        coord = make(tokenizer, [FakeDecoder()], tmp_path)
        with pytest.raises(ValueError, match="non-empty text or a non-empty list of token ids"):
            await coord.submit("r", [], None)
        with pytest.raises(ValueError, match="request_id must be a non-empty string"):
            await coord.submit("", "ROMEO:", None)
        await coord.submit("long", list(range(1001)), GenerationParams(max_new_tokens=2))  # the decoder refuses it
        return await stream(coord, "long")

    _, _, last = asyncio.run(main())
    assert last.finish_reason == "error" and "exceeds max_model_len" in last.error
