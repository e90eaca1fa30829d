"""The emulated link: it delivers at the rate and latency it is set to, in FIFO order, reports
its utilisation, keeps every source's interface, and an engine behind a slow link still gives
the resident tokens. Also: in-process sources return at once and read in the background.

Timing tests state their tolerance in their names: the link sleeps until a transfer's end,
and a loaded machine wakes a thread late, never early.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from conftest import corrupt_copy
from deploy.cli import main as cli
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_source import CheckpointSource, LocalSource
from specmoe.link import EmulatedLink, LinkConfig, link_for_r
from specmoe.offload import checkpoint_fetcher
from specmoe.sampling import SamplingParams
from specmoe.shards import CorruptShardError, PrepareConfig, prepare

LATE = 0.04  # how late a loaded 2-core machine may deliver


@pytest.fixture(scope="module")
def shards(shipped_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("link") / "shards"
    prepare(PrepareConfig(shipped_model, out), progress=False)
    return out


def wait_all(futures) -> list:
    return [f.result(timeout=30) for f in futures]


def pair_bytes(pair) -> int:
    return sum(t.nbytes for t in pair)


def test_20MB_over_a_0_2GBps_link_take_0_1s_at_most_40ms_late_and_saturate_it(shards):
    link = EmulatedLink(LocalSource(shards), LinkConfig(gbps=0.2))
    try:
        started = time.perf_counter()
        futures = []
        for _ in range(3):  # 102 experts of 196,608 bytes (bf16): 20.05 MB
            for layer in range(4):
                futures += link.fetch(layer, list(range(8))).values()
        futures += link.fetch(0, list(range(6))).values()
        moved = sum(pair_bytes(p) for p in wait_all(futures))
        took = time.perf_counter() - started
        want = moved / 0.2e9
        assert moved >= 20e6
        assert want - 0.002 <= took <= want + LATE, (took, want)
        m = link.metrics.snapshot()
        assert m["link_bytes"] == m["bytes"] == moved and m["link_transfers"] == len(futures) == m["requests"]
        assert m["link_busy_s"] == pytest.approx(want, rel=0.01)
        # saturated: busy all the time since the first request, but for the lateness allowed above
        assert m["link_utilisation"] >= want / (took + LATE), (m["link_utilisation"], took, want)
        time.sleep(2 * took)
        assert link.metrics.snapshot()["link_utilisation"] <= 0.4  # idle for two thirds of the time since
    finally:
        link.close()


def test_busy_time_counts_what_was_carried_so_far_not_what_is_scheduled():
    link = EmulatedLink(TwoStores(20_000_000), LinkConfig(gbps=0.2))  # one transfer of 0.1 s
    try:
        started = time.perf_counter()
        future = link.fetch(0, [0])[0]
        time.sleep(0.03)
        assert 0 < link.metrics.snapshot()["link_busy_s"] <= time.perf_counter() - started
        future.result(timeout=30)
        assert link.metrics.snapshot()["link_busy_s"] == pytest.approx(0.1)
    finally:
        link.close()


def test_an_idle_link_reports_utilisation_near_0(shards):
    link = EmulatedLink(LocalSource(shards), LinkConfig(gbps=1.0))
    try:
        wait_all(link.fetch(0, [0]).values())  # 0.2 ms of transfer
        time.sleep(0.3)
        m = link.metrics.snapshot()
        assert m["link_busy_s"] == pytest.approx(196_608 / 1e9, rel=0.01)
        assert m["link_utilisation"] < 0.01
    finally:
        link.close()


def test_transfers_are_delivered_in_the_order_they_were_requested(shards):
    link = EmulatedLink(LocalSource(shards, workers=4), LinkConfig(gbps=0.1))  # 2 ms per expert
    order, lock = [], threading.Lock()

    def note(key):
        def done(_):
            with lock:
                order.append(key)
        return done

    try:
        asked = []
        for layer in (3, 0, 2, 1):
            for e, future in link.fetch(layer, [7, 1, 4, 2]).items():
                asked.append((layer, e))
                future.add_done_callback(note((layer, e)))
        link.drain()
        assert order == asked
    finally:
        link.close()


def test_latency_is_added_per_request_and_overlaps_between_requests_50ms_at_most_40ms_late(shards):
    link = EmulatedLink(LocalSource(shards), LinkConfig(latency_us=50_000))  # no bandwidth limit
    try:
        started = time.perf_counter()
        wait_all(link.fetch(0, [0, 1, 2]).values())  # one request: one latency
        one = time.perf_counter() - started
        assert 0.05 <= one <= 0.05 + LATE
        started = time.perf_counter()
        wait_all([*link.fetch(1, [0]).values(), *link.fetch(2, [0]).values()])  # two in flight at once
        both = time.perf_counter() - started
        assert 0.05 <= both <= 0.05 + LATE
        started = time.perf_counter()
        for layer in (0, 1):  # one after the other: two latencies
            wait_all(link.fetch(layer, [3]).values())
        assert 0.1 <= time.perf_counter() - started <= 0.1 + LATE
    finally:
        link.close()


class TwoStores:
    """A source over two 'stores' (even experts on store 0, odd on store 1), delivering at once."""

    def __init__(self, nbytes: int):
        self.pair = (torch.zeros(nbytes // 4, dtype=torch.uint8), torch.zeros(3 * nbytes // 4, dtype=torch.uint8))
        self.owners = {(0, e): (e % 2, 1 - e % 2) for e in range(8)}

    def fetch(self, layer, experts):
        out = {}
        for e in experts:
            out[e] = Future()
            out[e].set_result(self.pair)
        return out


def test_a_queue_per_store_carries_in_parallel_and_one_per_decoder_in_series_at_most_40ms_late():
    took = {}
    for queue in ("decoder", "store"):
        link = EmulatedLink(TwoStores(2_000_000), LinkConfig(gbps=0.05, queue=queue))  # 40 ms per expert
        started = time.perf_counter()
        wait_all(link.fetch(0, [0, 1, 2, 3]).values())
        took[queue] = time.perf_counter() - started
        link.close()
    assert 0.16 <= took["decoder"] <= 0.16 + LATE
    assert 0.08 <= took["store"] <= 0.08 + LATE


class Computing(TwoStores):
    """A store that also runs experts (doubles the activations), as the gRPC source can."""

    def compute(self, layer, expert, x):
        out = Future()
        out.set_result(2 * x)
        return out


def test_remote_compute_through_the_link_carries_the_activations_there_and_back_at_most_40ms_late():
    link = EmulatedLink(Computing(1000), LinkConfig(gbps=0.1))
    try:
        x = torch.ones(1000, 5000)  # 20 MB there, 20 MB back: 0.4 s
        started = time.perf_counter()
        y = link.compute(0, 1, x).result(timeout=30)
        took = time.perf_counter() - started
        assert torch.equal(y, 2 * x) and 0.4 <= took <= 0.4 + LATE
        assert link.metrics.snapshot()["link_bytes"] == 40_000_000
    finally:
        link.close()


def test_a_queue_per_store_needs_a_source_that_knows_its_stores(shards):
    with pytest.raises(ValueError, match="queue 'store' needs a source that knows which store holds each expert"):
        EmulatedLink(LocalSource(shards), LinkConfig(queue="store"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(gbps=0), "link gbps must be a finite number of gigabytes per second > 0"),
    (dict(gbps=-1.5), "link gbps .* got -1.5"),
    (dict(gbps=float("inf")), "link gbps"),
    (dict(gbps="10"), "link gbps .* got '10'"),
    (dict(latency_us=-1), "link latency_us must be a finite number of microseconds >= 0, got -1"),
    (dict(latency_us=float("nan")), "link latency_us"),
    (dict(queue="lifo"), "link queue must be one of decoder, store, got 'lifo'"),
])
def test_link_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinkConfig(**kwargs)


def test_errors_and_checksums_reach_the_caller_through_the_link(shards, tmp_path):
    corrupt_copy(shards, tmp_path / "bad", layer=1, expert=2, tensor="down")
    link = EmulatedLink(LocalSource(tmp_path / "bad"), LinkConfig(gbps=1.0))
    try:
        futures = link.fetch(1, [1, 2])
        assert len(futures[1].result(timeout=30)) == 2
        with pytest.raises(CorruptShardError, match="does not match the manifest"):
            futures[2].result(timeout=30)
        with pytest.raises(KeyError, match="no expert 9 in layer 1"):
            link.fetch(1, [9])[9].result(timeout=30)
    finally:
        link.close()


def test_the_link_keeps_the_source_interface(shards):
    local = LocalSource(shards)
    link = EmulatedLink(local, LinkConfig(gbps=1.0))
    assert not hasattr(link, "compute") and not hasattr(link, "refresh")  # LocalSource has neither
    got = link(0, [5])[5].result(timeout=30)
    torch.testing.assert_close(got[0], local.reader.read(0, 5)[0])
    assert link.metrics.requests == 1  # the source's own counters, through the link's metrics
    link.close()
    with pytest.raises(RuntimeError):  # closing the link closed the source behind it
        local.fetch(0, [0])


def test_the_link_passes_on_the_affinity_table_of_the_source_behind_it(shards):
    local = LocalSource(shards)
    link = EmulatedLink(local, LinkConfig(gbps=1.0))
    assert link.affinity is None  # LocalSource carries none
    local.affinity = table = object()  # a deployment's source carries the prepared table
    assert link.affinity is table  # so a hot-policy decoder behind the link loads it instead of computing one
    link.affinity = other = object()  # what Deployment.source() does with the prepared table
    assert local.affinity is other and link.affinity is other
    link.close()


class Gate:
    """Holds every read of a source until released (or 10 s pass)."""

    def __init__(self, source):
        self.release, self.read = threading.Event(), source.read
        source.read = self

    def __call__(self, layer, expert):
        self.release.wait(10)
        return self.read(layer, expert)


@pytest.mark.parametrize("kind", ["shards", "checkpoint"])
def test_in_process_sources_return_at_once_and_deliver_in_the_background(kind, shards, shipped_model):
    source = LocalSource(shards) if kind == "shards" else checkpoint_fetcher(shipped_model)
    assert isinstance(source, LocalSource if kind == "shards" else CheckpointSource)
    gate = Gate(source)
    try:
        started = time.perf_counter()
        futures = source.fetch(2, [0, 3])
        assert time.perf_counter() - started < 1.0  # a synchronous read would wait for the gate (10 s)
        assert not any(f.done() for f in futures.values())
        gate.release.set()
        got = wait_all(futures.values())
        want = CheckpointSource(shipped_model).read(2, 3)
        torch.testing.assert_close(got[1][0].float(), want[0].float(), rtol=0, atol=0)
        torch.testing.assert_close(got[1][1].float(), want[1].float(), rtol=0, atol=0)
    finally:
        gate.release.set()
        source.close()


PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nWe are", "KING"]


@pytest.fixture(scope="module")
def resident_tokens(shipped_model):
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=3))
    return [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))]


@pytest.mark.parametrize("mode", ["specmoe", "ondemand"])
def test_an_engine_behind_a_slow_link_gives_the_resident_tokens(mode, shipped_model, resident_tokens):
    link = EmulatedLink(checkpoint_fetcher(shipped_model), LinkConfig(gbps=0.05, latency_us=300))  # 4 ms per expert
    try:
        decoder = DecoderConfig(mode=mode, draft_policy="shadow", k=3)
        engine = Engine(EngineConfig(model=shipped_model, max_batch_size=3, decoder=decoder), fetch=link)
        tokens = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))]
        assert tokens == resident_tokens
        assert engine.runtime.counters.bytes_moved > 0 and link.metrics.snapshot()["link_bytes"] > 0
        if mode == "specmoe":
            assert engine.counters.drafted_tokens > 0
            assert engine.runtime.counters.shadow_uses > 0  # drafts ran on the shadow while exact experts were in flight
    finally:
        link.close()


def test_the_bandwidth_for_R_is_the_active_bytes_over_R_resident_steps(shipped_model):
    c = link_for_r(shipped_model, 64)
    assert c.active_bytes == 4 * 2 * 196_608  # 4 MoE layers x top-2 x (gate_up + down) in bf16
    assert 0 < c.step_s < 1
    assert c.gbps == pytest.approx(c.active_bytes / (64 * c.step_s) / 1e9)
    with pytest.raises(ValueError, match="link R must be a finite number > 0"):
        link_for_r(shipped_model, 0)


def test_the_cli_puts_local_experts_behind_the_link_and_keeps_the_tokens(shipped_model, capsys):
    args = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "12", "--model", str(shipped_model)]
    assert cli(args) == 0
    resident = capsys.readouterr().out
    assert cli(args + ["--mode", "specmoe", "--link-r", "64", "--link-latency-us", "20"]) == 0
    out = capsys.readouterr()
    assert out.out == resident
    assert "[specmoe] link at R=64: resident step" in out.err and "GB/s" in out.err
    assert "link_utilisation" in out.err
    assert cli(args + ["--link-gbps", "1"]) == 2
    assert "--link-gbps has no effect with --mode resident" in capsys.readouterr().err
    assert cli(args + ["--mode", "ondemand", "--link-gbps", "-2"]) == 2
    assert "--link-gbps must be GB/s > 0, got -2.0" in capsys.readouterr().err
    assert cli(args + ["--mode", "ondemand", "--link-gbps", "1", "--link-r", "8"]) == 2
    assert "both set the link's bandwidth" in capsys.readouterr().err


def test_a_deployment_spec_carries_the_link_through_yaml_and_json(tmp_path):
    from cluster.deployment import DeploymentSpec

    spec = DeploymentSpec.from_dict({"transport": {"kind": "ray", "link": {"gbps": 2.5, "latency_us": 10}}})
    assert spec.transport.link == LinkConfig(gbps=2.5, latency_us=10)
    for suffix in (".yaml", ".json"):
        spec.save(tmp_path / f"spec{suffix}")
        assert DeploymentSpec.from_file(tmp_path / f"spec{suffix}") == spec
    with pytest.raises(ValueError, match="transport.link: link gbps must be .* got -1"):
        DeploymentSpec.from_dict({"transport": {"link": {"gbps": -1}}})
    with pytest.raises(ValueError, match="unknown keys in transport.link: mbps; allowed: gbps, latency_us, queue"):
        DeploymentSpec.from_dict({"transport": {"link": {"mbps": 1}}})


@pytest.mark.cluster
def test_ray_experts_behind_the_link_of_a_deployment_give_the_resident_tokens(shipped_model, resident_tokens):
    from cluster.sources import remote_experts

    with remote_experts(shipped_model, "ray", link=LinkConfig(gbps=0.1, latency_us=500)) as source:
        assert isinstance(source, EmulatedLink) and type(source.source).__name__ == "RaySource"
        assert callable(source.refresh)  # a decoder refreshes the RaySource behind the link
        decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3)
        engine = Engine(EngineConfig(model=shipped_model, max_batch_size=3, decoder=decoder), fetch=source)
        tokens = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))]
        source.drain()
        m = source.metrics.snapshot()
    assert tokens == resident_tokens
    assert m["link_bytes"] == m["bytes"] > 0 and 0 < m["link_utilisation"] <= 1


def test_a_rebuilt_source_keeps_counting_into_the_old_links_metrics(shards):
    old = EmulatedLink(LocalSource(shards), LinkConfig(gbps=1.0))
    wait_all(old.fetch(0, [0]).values())
    metrics = old.metrics
    old.close()
    fresh = EmulatedLink(LocalSource(shards), LinkConfig(gbps=1.0))
    fresh.metrics = metrics  # what a Decoder does when it builds its source again
    wait_all(fresh.fetch(0, [1]).values())
    fresh.drain()
    m = fresh.metrics.snapshot()
    assert (m["link_transfers"], m["requests"], m["link_bytes"], m["bytes"]) == (2, 2, 2 * 196_608, 2 * 196_608)
    fresh.close()


# -- a real gRPC store behind the link (an in-process server, as in test_shards_and_grpc) -------------


@pytest.fixture(scope="module")
def grpc_store(shards):
    from actors.grpc_service import ExpertTable, ServerConfig, serve_experts

    server, port = serve_experts(ExpertTable(shards), ServerConfig(token="t"))
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def grpc_behind_link(address: str, gbps: float) -> EmulatedLink:
    from actors.grpc_source import GrpcConfig, GrpcSource

    return EmulatedLink(GrpcSource([address], GrpcConfig(token="t")), LinkConfig(gbps=gbps))


def test_grpc_experts_behind_the_link_arrive_no_sooner_than_its_bandwidth_allows_at_most_80ms_late(grpc_store):
    link = grpc_behind_link(grpc_store, 0.05)  # 3.9 ms per expert of 196,608 bytes
    arrived, lock = [], threading.Lock()

    def note(future):
        with lock:
            arrived.append((time.perf_counter(), pair_bytes(future.result())))

    try:
        started = time.perf_counter()
        futures = [*link.fetch(0, list(range(8))).values(), *link.fetch(3, list(range(8))).values()]
        for f in futures:
            f.add_done_callback(note)
        moved = sum(pair_bytes(p) for p in wait_all(futures))
        took = time.perf_counter() - started
        assert moved == 16 * 196_608
        carried = 0
        for when, nbytes in sorted(arrived):  # the i-th expert no sooner than the bytes up to it take at 0.05 GB/s
            carried += nbytes
            assert when - started >= carried / 0.05e9 - 1e-4, (when - started, carried)
        want = moved / 0.05e9  # 63 ms
        assert want <= took <= want + 2 * LATE, (took, want)  # gRPC's own time overlaps the link's, but not all of it
        m = link.metrics.snapshot()
        assert m["link_bytes"] == m["bytes"] == moved and m["link_transfers"] == 16 and m["calls"] == 2
        assert m["link_busy_s"] == pytest.approx(want, rel=0.01)
        assert 0.6 <= m["link_utilisation"] <= 1.0  # busy for all but gRPC's first delivery since the first request
    finally:
        link.close()


def test_an_engine_over_grpc_behind_a_slow_link_gives_the_resident_tokens(grpc_store, shipped_model, resident_tokens):
    link = grpc_behind_link(grpc_store, 0.2)  # 1 ms per expert
    try:
        decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3)
        engine = Engine(EngineConfig(model=shipped_model, max_batch_size=3, decoder=decoder), fetch=link)
        tokens = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))]
        link.drain()
        m = link.metrics.snapshot()
        assert tokens == resident_tokens
        assert engine.counters.drafted_tokens > 0
        assert m["link_bytes"] == m["bytes"] >= engine.runtime.counters.bytes_moved > 0
        assert m["link_busy_s"] == pytest.approx(m["link_bytes"] / 0.2e9, rel=0.01) and 0 < m["link_utilisation"] <= 1
    finally:
        link.close()
