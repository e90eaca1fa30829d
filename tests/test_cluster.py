"""On a real multi-node Ray cluster on this machine: 2 store nodes and 1 decoder node.

ExpertStore actors on the store nodes serve the shipped model's experts through the Ray
object store and gRPC; a Decoder actor on the decoder node generates with them.
"""

from __future__ import annotations

import time

import pytest
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from conftest import corrupt_copy
from cluster.deployment import DecodersSpec, DeploymentSpec, ModelSpec, StoreSpec, TransportSpec, build_deployment
from cluster.local import ClusterSpec, LocalCluster
from actors.decoder import decoder_actor
from actors.expert_store import store_actor
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.sampling import SamplingParams

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(ClusterSpec(stores=2, decoders=1, head_cpus=1, decoder_cpus=1, object_store_mb=200)) as c:
        yield c


def deploy_stores(model, shards, name: str, count: int, replication: int = 1, max_restarts: int = 0, kind: str = "ray"):
    """Stores only (no decoders), through the one builder."""
    return build_deployment(DeploymentSpec(
        name=name, model=ModelSpec(path=str(model), shards=str(shards)), transport=TransportSpec(kind=kind),
        stores=StoreSpec(count=count, replication=replication, max_restarts=max_restarts), decoders=DecodersSpec(count=0),
    ))


@pytest.fixture(scope="class")
def stores(cluster, shipped_model, shards):
    """One store per store node (each holds its node's ``expert_store`` resource until killed)."""
    deployment = deploy_stores(shipped_model, shards, "serving", count=2, kind="grpc")
    yield deployment.stores
    deployment.shutdown()


class TestServing:
    def test_stores_run_on_store_nodes(self, cluster, stores):
        _stores_run_on_store_nodes(cluster, stores)

    @pytest.mark.parametrize("transport", ["ray", "grpc"])
    def test_every_expert_is_byte_identical_to_the_checkpoint(self, stores, expected, transport):
        _every_expert_is_byte_identical(stores, expected, transport)

    def test_decoder_on_another_node_generates_the_resident_tokens(self, cluster, stores, shipped_model):
        _decoder_on_another_node(cluster, stores, shipped_model)


def _stores_run_on_store_nodes(cluster, stores):
    store_nodes = {n.node_id for n in cluster.store_nodes}
    nodes = {ray.get(h.health.remote())["node_id"] for h in stores.handles}
    assert nodes == store_nodes  # one store on each store node


def _every_expert_is_byte_identical(stores, expected, transport):
    source = stores.ray_source() if transport == "ray" else stores.grpc_source()
    for layer in range(4):
        for e, future in source.fetch(layer, list(range(8))).items():
            gate_up, down = future.result()
            assert torch.equal(gate_up, expected[(layer, e)][0]) and torch.equal(down, expected[(layer, e)][1])
    m = source.metrics.snapshot()
    assert m["requests"] == 32 and m["bytes"] == sum(a.nbytes + b.nbytes for a, b in expected.values())
    source.close()


def _decoder_on_another_node(cluster, stores, shipped_model):
    prompts = [[int(t) for t in torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(n))] for n in (3, 9)]
    params = SamplingParams(max_new_tokens=24)
    resident = decoder_actor().remote(EngineConfig(model=shipped_model, max_batch_size=2))
    want = ray.get(resident.generate.remote(prompts, params))
    ray.kill(resident)  # the decoder node runs one decoder at a time
    for decoder, grpc in [(DecoderConfig(mode="specmoe", k=3), False), (DecoderConfig(mode="ondemand"), True)]:
        actor = decoder_actor().remote(
            EngineConfig(model=shipped_model, max_batch_size=2, decoder=decoder),
            stores.source_spec(TransportSpec(kind="grpc" if grpc else "ray")),
        )
        assert ray.get(actor.health.remote())["node_id"] == cluster.decoder_nodes[0].node_id
        assert ray.get(actor.generate.remote(prompts, params)) == want
        assert ray.get(actor.metrics.remote())["transport"]["bytes"] > 0
        ray.kill(actor)


def test_a_corrupt_shard_stops_the_store_from_starting(cluster, shards, tmp_path):
    bad = tmp_path / "bad"
    corrupt_copy(shards, bad, 2, 5, "gate_up")
    store = store_actor().remote(str(bad), [(2, 5)])
    with pytest.raises(RayActorError, match=r"'gate_up' of layer 2 expert 5"):
        ray.get(store.health.remote())


def test_a_killed_store_fails_over_to_its_replica(cluster, shipped_model, shards, expected):
    deployment = deploy_stores(shipped_model, shards, "failover", count=2, replication=2)
    stores = deployment.stores
    source = stores.ray_source()
    assert source.fetch(1, [0, 5])[5].result()[0].shape == (512, 128)  # references cached
    ray.kill(stores.handles[0], no_restart=True)
    for layer in range(4):
        got = source.fetch(layer, list(range(8)))
        assert all(torch.equal(got[e].result()[1], expected[(layer, e)][1]) for e in range(8))
    assert source.metrics.failovers >= 1
    deployment.shutdown()


def wait_until_restarted(handle, old_pid: int, timeout_s: float = 60.0) -> bool:
    """Until the store answers from a new process (``ray.kill`` returns before the old one dies)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = ray.get(handle.health.remote(), timeout=5)
            if health["pid"] != old_pid:
                return health["serving"]
        except (ActorUnavailableError, RayActorError, GetTimeoutError):
            pass
        time.sleep(0.2)
    return False


def test_without_a_replica_a_restarted_store_is_asked_again(cluster, shipped_model, shards, expected):
    """(Faults while it restarts: tests/test_transport_faults.py.)"""
    deployment = deploy_stores(shipped_model, shards, "restart", count=1, max_restarts=1)
    stores = deployment.stores
    source = stores.ray_source()
    source.fetch(0, [3])[3].result()  # caches the references of layer 0's experts
    old_pid = ray.get(stores.handles[0].health.remote())["pid"]
    ray.kill(stores.handles[0], no_restart=False)  # crash: Ray restarts it, its objects are gone
    assert wait_until_restarted(stores.handles[0], old_pid)  # restarted and published again
    # the cached references died with the old process: the store answers a probe, so it is asked again
    assert torch.equal(source.fetch(0, [4])[4].result()[0], expected[(0, 4)][0])
    assert source.metrics.failovers == 1 and not source.down
    deployment.shutdown()
