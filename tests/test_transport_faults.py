"""Transports under faults: stores killed or restarted mid-generation (Ray), hung replicas and
stalled or hostile clients (gRPC). Real Ray clusters and real gRPC servers throughout."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time

import grpc
import pytest
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.expert_store import STORE_RESOURCE, ExpertStore
from actors.grpc_service import MIN_CHUNK_BYTES, ExpertTable, ServerConfig, serve_experts
from actors.grpc_source import GrpcConfig, GrpcSource
from actors.ray_source import RaySource
from cluster.local import ClusterSpec, LocalCluster
from cluster.placement import plan_placement
from protos import expert_service_pb2 as pb2
from protos import expert_service_pb2_grpc as pb2_grpc
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_source import ExpertUnavailableError
from specmoe.sampling import SamplingParams
from specmoe.shards import EXPERT_TENSORS, ShardReader

RESTART_S = 3.0  # how much longer a SlowRestartStore takes to restart than to start
FAST = dict(timeout_s=10.0, probe_timeout_s=0.5, retry_after_s=1.0)  # short waits: a test should not sit out 30 s


# -- Ray: stores that die or restart --------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(ClusterSpec(stores=2, decoders=0, head_cpus=1, object_store_mb=100)) as c:
        yield c


class SlowRestartStore(ExpertStore):
    """An ExpertStore whose restart takes RESTART_S more: a window in which it answers nothing."""

    def __init__(self, *args):
        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(RESTART_S)
        super().__init__(*args)


class Stores:
    """ExpertStore actors, one per store node, holding a placement of the shards."""

    def __init__(self, shards, count: int, replication: int, max_restarts: int = 0):
        reader = ShardReader(shards)
        sizes = {k: sum(e["nbytes"] for e in reader.entries(*k) if e["name"] in EXPERT_TENSORS) for k in reader.keys()}
        self.placement = plan_placement(sizes, count, replication)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
        actor = ray.remote(num_cpus=0, resources={STORE_RESOURCE: 1}, max_restarts=max_restarts)(SlowRestartStore)
        self.handles = [actor.remote(str(shards), sorted(keys)) for keys in self.placement.stores]
        ray.get([h.health.remote() for h in self.handles])

    def source(self) -> RaySource:
        return RaySource(self.handles, self.placement.owners, **FAST)

    def kill(self) -> None:
        for h in self.handles:
            ray.kill(h, no_restart=True)


def run_steps(engine: Engine, prompts, params, after_step) -> list[list[int]]:
    """Generate step by step, calling ``after_step(n)`` after round n; tokens per prompt."""
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    rounds = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        rounds += 1
        after_step(rounds)
    return [tokens[i] for i in ids]


def pid_of(handle) -> int:
    return ray.get(handle.health.remote())["pid"]


def wait_until_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Until the killed store's process has exited (``ray.kill`` returns before it does)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)  # the local cluster's processes are this machine's
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"the killed store (pid {pid}) is still running")


def wait_until_restarted(handle, old_pid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(handle.health.remote(), timeout=5)["pid"] != old_pid:
                return
        except (ActorUnavailableError, RayActorError, GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("the store did not restart")


@pytest.mark.cluster
def test_a_store_killed_mid_generation_costs_no_tokens(cluster, shards, shipped_model):
    """Replication 2: one store dies after round 2; the run ends with the resident tokens, and
    only the dead store is marked down although stale fetches of its references fail later."""
    prompts = [[int(t) for t in torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(n))] for n in (3, 9)]
    params = SamplingParams(max_new_tokens=24)
    want = [c.token_ids for c in Engine(EngineConfig(model=shipped_model, max_batch_size=2)).generate(prompts, params)]
    stores = Stores(shards, count=2, replication=2)
    source = stores.source()
    # drafting with resident experts only, nothing pinned: experts are first fetched when a round needs them, so
    # rounds after the kill need experts whose objects died with the store (objects already here stay readable)
    decoder = DecoderConfig(mode="specmoe", k=3, cache_budget=0.25, draft_policy="resident", pinned_fraction=0.0)
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=2, decoder=decoder), fetch=source)
    victim = stores.handles[0]

    def kill(rounds: int) -> None:
        if rounds == 2:
            ray.kill(victim, no_restart=True)
            wait_until_gone(old_pid)

    old_pid = pid_of(victim)
    try:
        assert run_steps(engine, prompts, params, kill) == want
        assert source.metrics.failovers >= 1
        assert sorted(source.down) == [0]  # never the replica that served the failover
    finally:
        stores.kill()


@pytest.mark.cluster
def test_without_replicas_a_restarted_store_serves_again_and_the_live_one_never_stops(cluster, shards, expected):
    """Replication 1: while store 0 restarts, store 1's experts are still delivered and only
    store 0's are unavailable; once it is back, a probe finds it and its experts are served,
    without a refresh()."""
    stores = Stores(shards, count=2, replication=1, max_restarts=1)
    source = stores.source()
    owner = {e: stores.placement.owners[(0, e)][0] for e in range(8)}
    on0, on1 = [e for e in range(8) if owner[e] == 0], [e for e in range(8) if owner[e] == 1]
    assert on0 and on1
    try:
        got = source.fetch(0, [on0[0], on1[0]])  # caches the references of all of layer 0's experts
        assert all(torch.equal(got[e].result()[0], expected[(0, e)][0]) for e in (on0[0], on1[0]))
        old_pid = pid_of(stores.handles[0])
        ray.kill(stores.handles[0], no_restart=False)  # crash: Ray restarts it, its objects are gone
        wait_until_gone(old_pid)

        got = source.fetch(0, list(range(8)))  # while it restarts
        for e in on1:
            assert torch.equal(got[e].result()[1], expected[(0, e)][1])
        for e in on0:
            with pytest.raises(ExpertUnavailableError, match=rf"expert {e} of layer 0: no store holding it answered \(stores \[0\], down: \[0\]\)"):
                got[e].result()
        assert sorted(source.down) == [0] and source.metrics.failovers == 1
        assert source.generation == [1, 0]  # store 1 was never suspected: its references were kept

        wait_until_restarted(stores.handles[0], old_pid)
        time.sleep(FAST["retry_after_s"])  # then the next fetch probes it again
        got = source.fetch(0, list(range(8)))
        assert all(torch.equal(got[e].result()[1], expected[(0, e)][1]) for e in range(8))
        assert not source.down
        got = source.fetch(1, on0)  # other layers: references from the new process, asked for once
        assert all(torch.equal(got[e].result()[0], expected[(1, e)][0]) for e in on0)
    finally:
        stores.kill()


@pytest.mark.cluster
def test_a_restarted_store_is_asked_again_at_once(cluster, shards, expected):
    """A store that restarted before the failure was noticed answers the probe: its experts
    are asked of it again in the same fetch (no error, no wait), and a stale second fetch of
    the same layer blames no one."""
    stores = Stores(shards, count=2, replication=1, max_restarts=1)
    source = stores.source()
    try:
        first = source.fetch(2, list(range(8)))
        stale = source.fetch(2, list(range(8)))  # references from before the restart too
        old_pid = pid_of(stores.handles[0])
        ray.kill(stores.handles[0], no_restart=False)
        wait_until_restarted(stores.handles[0], old_pid)
        for got in (first, stale):
            assert all(torch.equal(got[e].result()[0], expected[(2, e)][0]) for e in range(8))
        assert not source.down and source.metrics.failovers == 2  # each fetch asked again once
        assert source.generation == [1, 0]  # the stale fetch did not make store 0 drop its new references
    finally:
        stores.kill()


# -- gRPC: a hung replica -------------------------------------------------------------------

class FreezableProxy:
    """A TCP proxy in front of a real server that can hang: while frozen it accepts connections
    and forwards nothing either way (a store that accepts but never answers)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.served = 0  # bytes forwarded from the server to clients
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, served: bool) -> None:
        try:
            while True:
                self.flowing.wait()  # frozen: read nothing, so nothing is answered
                data = src.recv(1 << 16)
                if not data:
                    break
                self.flowing.wait()
                dst.sendall(data)
                self.served += len(data) if served else 0
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.flowing.set()
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture(scope="module")
def table(shards):
    return ExpertTable(shards)


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def fetch_all(source, layer: int) -> dict:
    got = source.fetch(layer, list(range(8)))
    return {e: f.result() for e, f in got.items()}


@pytest.mark.cluster
def test_a_hung_primary_costs_one_derived_deadline_then_is_skipped_until_a_probe_finds_it_back(table, expected):
    servers = [serve_experts(table, ServerConfig())[0] for _ in range(2)]
    proxy = FreezableProxy(servers[0].port)
    layer_bytes = sum(table.expert_bytes((0, e)) for e in range(8))
    cfg = GrpcConfig(deadline_s=0.5, floor_bytes_per_s=layer_bytes / 2.0, retry_after_s=1.0, probe_timeout_s=0.5)
    deadline = cfg.deadline(layer_bytes)  # 2.5 s for a layer from one store
    source = GrpcSource([f"127.0.0.1:{proxy.port}", f"127.0.0.1:{servers[1].port}"], cfg,
                        owners={(layer, e): (0, 1) for layer in range(4) for e in range(8)})
    try:
        fetch_all(source, 1)  # connected, manifest learned, the primary served
        assert proxy.served > layer_bytes

        proxy.flowing.clear()  # the primary hangs
        got, took = timed(lambda: fetch_all(source, 0))
        assert all(torch.equal(got[e][0], expected[(0, e)][0]) for e in range(8))  # from the replica
        assert deadline <= took < deadline + 1.5
        assert source.metrics.failovers == 1 and source.breakers[0].open

        got, took = timed(lambda: fetch_all(source, 2))  # the hung primary is skipped at once
        assert all(torch.equal(got[e][1], expected[(2, e)][1]) for e in range(8))
        assert took < deadline / 2 and source.metrics.failovers == 1

        proxy.flowing.set()  # it answers again
        time.sleep(cfg.retry_after_s)
        served = proxy.served
        got = fetch_all(source, 3)  # a probe finds it back: served by the primary again
        assert all(torch.equal(got[e][0], expected[(3, e)][0]) for e in range(8))
        assert proxy.served - served > layer_bytes and not source.breakers[0].open
    finally:
        source.close()
        proxy.close()
        for server in servers:
            server.stop(grace=None)


@pytest.mark.cluster
def test_with_every_holder_down_the_error_names_them_at_once(table):
    server, port = serve_experts(table, ServerConfig())
    source = GrpcSource([f"127.0.0.1:{port}"], GrpcConfig(deadline_s=0.5, retry_after_s=60), owners={(0, 0): (0,)})
    server.stop(grace=None)
    try:
        with pytest.raises(ExpertUnavailableError, match=r"experts \[0\] of layer 0: no store answered \(failed now: \['127"):
            source.fetch(0, [0])[0].result()
        started = time.perf_counter()
        with pytest.raises(ExpertUnavailableError, match=r"skipped, failed within the last 60 s: \['127"):
            source.fetch(0, [0])[0].result()
        assert time.perf_counter() - started < 0.5 and source.metrics.failovers == 1  # the breaker answered
    finally:
        source.close()


# -- gRPC: stalled and hostile clients --------------------------------------------------------

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def stub(port: int, **options):
    return pb2_grpc.ExpertServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=list(options.items())))


def stalled_fetches(port: int, count: int, layer: int = 0) -> list:
    """``count`` Fetch streams of a whole layer whose clients never read (no window growth, so
    HTTP/2 flow control holds the server back after a few KiB)."""
    calls = []
    for _ in range(count):
        s = stub(port, **{"grpc.http2.bdp_probe": 0})
        calls.append(s.Fetch(pb2.FetchRequest(layer=layer, experts=list(range(8))), metadata=AUTH))
    time.sleep(0.5)  # the server has started every stream and is waiting for the readers
    return calls


@pytest.mark.cluster
def test_stalled_fetch_streams_do_not_starve_the_store(table, expected):
    server, port = serve_experts(table, ServerConfig(token=TOKEN))
    calls = stalled_fetches(port, 12)  # more than a thread pool's workers
    try:
        healthy = stub(port)
        _, took = timed(lambda: healthy.Health(pb2.HealthRequest(), metadata=AUTH, timeout=5))
        assert took < 1.0
        source = GrpcSource([f"127.0.0.1:{port}"], GrpcConfig(token=TOKEN, deadline_s=2))
        got, took = timed(lambda: fetch_all(source, 0))
        assert all(torch.equal(got[e][0], expected[(0, e)][0]) for e in range(8)) and took < 2.0
        source.close()
    finally:
        for call in calls:
            call.cancel()
        server.stop(grace=None)


@pytest.mark.cluster
def test_stalled_streams_are_ended_and_too_many_are_refused(table):
    server, port = serve_experts(table, ServerConfig(token=TOKEN, max_fetch_streams=3, stall_timeout_s=1.0))
    calls = stalled_fetches(port, 3)
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub(port).Fetch(pb2.FetchRequest(layer=1, experts=[0]), metadata=AUTH, timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 3 Fetch streams" in err.value.details()
        deadline = time.monotonic() + 5
        while server.servicer.streams and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.servicer.streams == 0  # no longer served after 1 s without progress: their slots are free
        assert len(list(stub(port).Fetch(pb2.FetchRequest(layer=1, experts=[0]), metadata=AUTH, timeout=5))) == 2
    finally:
        for call in calls:
            call.cancel()
        server.stop(grace=None)


@pytest.fixture(scope="module")
def hostile(table):
    """A store with a token and a 300 KiB request limit (an expert is 192 KiB)."""
    server, port = serve_experts(table, ServerConfig(token=TOKEN, max_request_bytes=300 << 10))
    yield stub(port)
    server.stop(grace=None)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.mark.cluster
def test_fetch_limits_chunk_size_duplicates_and_bytes(hostile, table):
    def fetch(**request):
        return list(hostile.Fetch(pb2.FetchRequest(**request), metadata=AUTH, timeout=5))

    err = rpc_error(lambda: fetch(layer=0, experts=[0], chunk_bytes=1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"outside [{MIN_CHUNK_BYTES}," in err.details()
    one = fetch(layer=0, experts=[3], chunk_bytes=MIN_CHUNK_BYTES)
    assert sum(len(m.data) for m in one) == table.expert_bytes((0, 3))
    dup = fetch(layer=0, experts=[3] * 500)  # each expert once: not 500 copies
    assert sum(len(m.data) for m in dup) == table.expert_bytes((0, 3))
    err = rpc_error(lambda: fetch(layer=0, experts=[3, 4]))  # 384 KiB
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"asks for {2 * table.expert_bytes((0, 3))} bytes, over this store's limit of {300 << 10}" in err.details()
    with pytest.raises(ValueError, match=rf"chunk_bytes must be in \[{MIN_CHUNK_BYTES}, "):
        ServerConfig(chunk_bytes=1)


@pytest.mark.cluster
def test_compute_with_zero_tokens_is_invalid_argument(hostile):
    request = pb2.ComputeRequest(layer=0, expert=0, dtype="float32", shape=[0, 128], activations=b"")
    err = rpc_error(lambda: hostile.Compute(request, metadata=AUTH, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "n >= 1 tokens, got [0, 128]" in err.details()


@pytest.mark.cluster
def test_the_token_is_compared_in_constant_time_and_kept_out_of_reprs(hostile, monkeypatch):
    compared = []

    def compare_digest(a, b):
        compared.append((a, b))
        return hmac_compare(a, b)

    hmac_compare = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    assert hostile.Health(pb2.HealthRequest(), metadata=AUTH, timeout=5).serving
    err = rpc_error(lambda: hostile.Health(pb2.HealthRequest(), metadata=(("authorization", "Bearer s3creT"),), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert compared == [(b"Bearer s3cret", b"Bearer s3cret"), (b"Bearer s3creT", b"Bearer s3cret")]
    for cfg in (ServerConfig(token=TOKEN), GrpcConfig(token=TOKEN)):
        assert TOKEN not in repr(cfg) and "chunk_bytes" in repr(cfg)


@pytest.mark.cluster
def test_a_store_reachable_from_other_machines_needs_a_token_and_tls(table, tmp_path, caplog):
    with pytest.raises(ValueError, match=r"on 0\.0\.0\.0 \(not a loopback address\) without a token or TLS \(tls_cert, tls_key\)"):
        ServerConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match=r"on 10\.1\.2\.3 .* without TLS"):
        ServerConfig(host="10.1.2.3", token=TOKEN)
    with pytest.raises(ValueError, match=r"on store-1\.example .* without a token"):
        ServerConfig(host="store-1.example", tls_cert="c.pem", tls_key="k.pem")
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        assert ServerConfig(host=host).unprotected() == []
    with caplog.at_level(logging.WARNING, logger="actors.grpc_service"):
        server, _ = serve_experts(table, ServerConfig(host="0.0.0.0", insecure_ok=True))
        server.stop(grace=None)
    assert "serving experts on 0.0.0.0 without a token or TLS" in caplog.text


@pytest.mark.parametrize("file", ["../../etc/passwd", "/etc/passwd"])
def test_a_store_opens_no_file_outside_its_shard_directory(shards, tmp_path, file):
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tensors"][5]["file"] = file
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"outside its directory: '{re.escape(file)}'"):
        ExpertTable(out)
