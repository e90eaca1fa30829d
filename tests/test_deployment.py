"""One DeploymentSpec, one build_deployment: specs from files, clear errors, and a real
multi-node cluster (2 store nodes, 2 decoder nodes) on which decoders share one set of stores,
a second build attaches instead of starting anew, and a decoder outlives a store restart.
"""

from __future__ import annotations

import shutil

import time

import pytest
import torch

from cluster.deployment import (
    CoordinatorSpec,
    DecodersSpec,
    DeploymentSpec,
    ModelSpec,
    StoreSpec,
    TransportSpec,
    build_deployment,
)
from actors.decoder import Decoder, DecoderDead, DecoderRoundError, RetryPolicy
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.expert_source import ExpertUnavailableError
from specmoe.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True)
PROMPTS = [[int(t) for t in torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(n))] for n in (3, 9)]
SPECMOE = DecoderConfig(mode="specmoe", k=2, cache_budget=0.25)


@pytest.fixture(scope="module")
def resident(shipped_model):
    return [c.token_ids for c in Engine(EngineConfig(model=shipped_model)).generate(PROMPTS, PARAMS)]


# -- specs ---------------------------------------------------------------------------------------


def test_a_spec_round_trips_through_yaml_and_json(tmp_path, shipped_model):
    spec = DeploymentSpec(
        name="rt", namespace="tests", model=ModelSpec(path=str(shipped_model), dtype="bf16", max_model_len=256),
        stores=StoreSpec(count=3, replication=2, resources={"expert_store": 0.5}, max_restarts=2),
        transport=TransportSpec(kind="grpc", verify=False, token="secret", tls_cert="store.pem", tls_key="store.key",
                                server_name="localhost"),
        decoders=DecodersSpec(count=2, num_gpus=1, resources={}, device="cuda", max_batch_size=8,
                              config=DecoderConfig(mode="pregate", k=0, cache_budget=0.5, eviction="lru")),
        coordinator=CoordinatorSpec(max_queue=64, max_batch_per_decoder=8, journal="journal.bin", decoder_failures=5),
    )
    for suffix in (".yaml", ".json"):
        spec.save(tmp_path / f"spec{suffix}")
        assert DeploymentSpec.from_file(tmp_path / f"spec{suffix}") == spec
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec


def test_a_hand_written_yaml_spec_fills_in_the_defaults(tmp_path):
    (tmp_path / "spec.yml").write_text(
        "name: demo\nstores:\n  count: 2\ntransport:\n  kind: grpc\n  token: t0k3n\n"
        "decoders:\n  count: 2\n  config:\n    mode: ondemand\n    cache_budget: 0.5\n"
    )
    spec = DeploymentSpec.from_file(tmp_path / "spec.yml")
    assert (spec.name, spec.stores.count, spec.stores.replication, spec.transport.token) == ("demo", 2, 1, "t0k3n")
    assert spec.decoders.config == DecoderConfig(mode="ondemand", cache_budget=0.5)
    assert spec.coordinator == CoordinatorSpec() and spec.namespace == "specmoe"


@pytest.mark.parametrize("data, message", [
    ({"decoder": {}}, r"unknown keys in the deployment spec: decoder; allowed: name, namespace, model"),
    ({"decoders": {"devices": "cpu"}}, r"unknown keys in decoders: devices"),
    ({"decoders": {"config": {"mode": "fast"}}}, r"decoders.config: unknown mode 'fast'"),
    ({"stores": {"count": 2, "replication": 3}}, r"stores.replication must be in \[1, stores.count=2\], got 3"),
    ({"stores": {"count": "two"}}, r"stores.count must be an integer >= 1, got 'two'"),
    ({"stores": {"resources": {"expert_store": -1}}}, r"stores.resources\['expert_store'\] must be a number >= 0"),
    ({"transport": {"kind": "http"}}, r"transport.kind must be one of ray, grpc, got 'http'"),
    ({"transport": {"kind": "grpc", "chunk_bytes": 1024}}, r"transport.chunk_bytes must be an integer >= 65536, got 1024"),
    ({"transport": {"token": "x"}}, r"transport.token applies to the grpc transport only"),
    ({"transport": {"kind": "grpc", "tls_cert": "a.pem"}}, r"tls_cert and transport.tls_key .* give both or neither"),
    ({"decoders": {"device": "cuda"}}, r"decoders.device is 'cuda' but decoders.num_gpus is 0"),
    ({"name": "my deployment"}, r"name must be letters, digits"),
    ({"coordinator": {"max_batch_per_decoder": 32}}, r"max_batch_per_decoder \(32\) must not exceed decoders.max_batch_size \(16\)"),
])
def test_a_bad_spec_names_the_field_and_what_is_allowed(data, message):
    with pytest.raises(ValueError, match=message):
        DeploymentSpec.from_dict(data)


def test_a_bad_spec_file_is_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("stores: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml' is not valid YAML"):
        DeploymentSpec.from_file(tmp_path / "bad.yaml")
    (tmp_path / "spec.toml").write_text("")
    with pytest.raises(ValueError, match=r"use a .yaml, .yml or .json file"):
        DeploymentSpec.from_file(tmp_path / "spec.toml")
    (tmp_path / "unknown.json").write_text('{"stores": {"count": 1, "replicas": 2}}')
    with pytest.raises(ValueError, match=r"unknown.json': unknown keys in stores: replicas"):
        DeploymentSpec.from_file(tmp_path / "unknown.json")


# -- the Decoder's failure contract, in-process -----------------------------------------------------


def test_a_decoder_retries_store_failures_then_reports_them_with_requests_intact(shipped_model, resident):
    decoder = Decoder(EngineConfig(model=shipped_model, decoder=DecoderConfig(mode="ondemand")),
                      retry=RetryPolicy(attempts=3, backoff_s=0.0))
    decoder.add_request("a", PROMPTS[0], PARAMS)
    step, calls = decoder.engine.step, []

    def failing():
        calls.append(1)
        raise ExpertUnavailableError("expert 1 of layer 0: injected")

    decoder.engine.step = failing
    with pytest.raises(DecoderRoundError, match="failed 3 times on expert stores; requests are intact"):
        decoder.step()
    assert len(calls) == 3 and decoder.health()["alive"] and decoder.health()["waiting"] == 1
    decoder.engine.step = step  # the stores are back: the request completes with the resident tokens
    tokens = []
    while decoder.health()["running"] + decoder.health()["waiting"]:
        tokens += [t for out in decoder.step() for t in out.new_token_ids]
    assert tokens == resident[0]


def test_an_error_that_is_not_a_store_failure_marks_the_decoder_dead(shipped_model):
    decoder = Decoder(EngineConfig(model=shipped_model))
    decoder.add_request("a", PROMPTS[0], PARAMS)
    with pytest.raises(ValueError, match="already being served"):
        decoder.add_request("a", PROMPTS[1], PARAMS)
    decoder.abort("never-added")  # ignored
    decoder.engine.step = lambda: 1 / 0
    with pytest.raises(DecoderDead, match="ZeroDivisionError"):
        decoder.step()
    assert decoder.health()["alive"] is False
    with pytest.raises(DecoderDead):
        decoder.add_request("b", PROMPTS[1], PARAMS)


# -- on a cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster.local import ClusterSpec, LocalCluster

    with pytest.MonkeyPatch.context() as mp:  # shards are prepared on first use, into a cache of this module's own
        mp.setenv("SPECMOE_CACHE", str(tmp_path_factory.mktemp("shard-cache")))
        with LocalCluster(ClusterSpec(stores=2, decoders=2, head_cpus=1, decoder_cpus=1, object_store_mb=200)) as c:
            yield c


def shared_spec(model, journal, **stores) -> DeploymentSpec:
    # half a node's resource each, so that the restart test's deployment fits beside this one
    return DeploymentSpec(
        name="shared", namespace="tests",
        model=ModelSpec(path=str(model)),
        stores=StoreSpec(**({"count": 2, "resources": {"expert_store": 0.5}, "max_restarts": 0} | stores)),
        decoders=DecodersSpec(count=2, resources={"decoder": 0.5}, max_batch_size=4, config=SPECMOE),
        coordinator=CoordinatorSpec(max_batch_per_decoder=4, journal=str(journal)),
    )


@pytest.fixture(scope="module")
def shared(cluster, shipped_model, tmp_path_factory):
    spec = shared_spec(shipped_model, tmp_path_factory.mktemp("journal") / "shared.journal")
    deployment = build_deployment(spec)
    yield deployment
    deployment.shutdown()


@pytest.mark.cluster
def test_two_decoders_share_one_copy_of_the_experts_and_give_the_resident_tokens(shared, resident):
    import ray

    assert ray.get([d.generate.remote(PROMPTS, PARAMS) for d in shared.decoders]) == [resident, resident]
    named = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "tests")
    assert [n for n in named if "-store-" in n] == ["shared-store-0", "shared-store-1"]
    one_copy = sum(n for n in shared.stores.placement.bytes_per_store(_sizes(shared)))
    assert sum(h["bytes"] for h in shared.stores.health()) == one_copy
    for decoder in shared.decoders:
        assert ray.get(decoder.metrics.remote())["transport"]["bytes"] > 0


def _sizes(deployment) -> dict:
    from cluster.deployment import expert_sizes
    from cluster.sources import prepared_dir
    from specmoe.shards import ShardReader

    return expert_sizes(ShardReader(prepared_dir(deployment.spec.model.path)))


@pytest.mark.cluster
def test_a_second_build_attaches_to_the_running_actors(shared, shipped_model, checkpoints, tmp_path):
    import ray

    again = build_deployment(shared_spec(shipped_model, tmp_path / "j"))
    assert [h["pid"] for h in again.stores.health()] == [h["pid"] for h in shared.stores.health()]
    assert ray.get([d.health.remote() for d in again.decoders]) == ray.get([d.health.remote() for d in shared.decoders])
    copy = shutil.copytree(shipped_model, tmp_path / "uploaded-copy")  # a job's working dir: same model, new path
    moved = build_deployment(shared_spec(copy, tmp_path / "j"))
    assert ray.get([d.health.remote() for d in moved.decoders]) == ray.get([d.health.remote() for d in shared.decoders])
    changed = shared_spec(shipped_model, tmp_path / "j")
    changed.decoders.config = DecoderConfig(mode="specmoe", k=1)
    with pytest.raises(ValueError, match=r"decoder 'shared-decoder-0' runs another configuration"):
        build_deployment(changed)
    with pytest.raises(ValueError, match=r"store 'shared-store-0' holds another placement"):
        build_deployment(shared_spec(shipped_model, tmp_path / "j", replication=2))
    other = DeploymentSpec.from_dict(shared_spec(shipped_model, tmp_path / "j").to_dict()
                                     | {"model": {"path": str(checkpoints[("mixtral", "per_expert")])}})
    with pytest.raises(ValueError, match=r"store 'shared-store-0' serves model \w+, not \w+"):
        build_deployment(other)


@pytest.mark.cluster
def test_a_decoder_refreshes_by_itself_after_its_only_store_restarts(shared, shipped_model, resident, tmp_path):
    import ray

    spec = DeploymentSpec(
        name="restart", namespace="tests", model=ModelSpec(path=str(shipped_model)),
        stores=StoreSpec(count=1, resources={"expert_store": 0.5}, max_restarts=-1),
        decoders=DecodersSpec(count=1, resources={"decoder": 0.5}, max_batch_size=4, config=SPECMOE),
        coordinator=CoordinatorSpec(max_batch_per_decoder=4, journal=str(tmp_path / "restart.journal")),
    )
    deployment = build_deployment(spec)
    try:
        decoder, store = deployment.decoders[0], deployment.stores.handles[0]
        assert ray.get(decoder.generate.remote(PROMPTS, PARAMS)) == resident  # references cached
        old_pid = ray.get(store.health.remote())["pid"]
        ray.kill(store, no_restart=False)  # a crash: Ray restarts it and it publishes again
        _wait_until_exited(old_pid)  # generation starts while the store is still coming back
        assert ray.get(decoder.generate.remote(PROMPTS, PARAMS)) == resident
        assert ray.get(decoder.health.remote())["alive"]
    finally:
        deployment.shutdown()


def _wait_until_exited(pid: int, timeout_s: float = 30.0) -> None:
    """Until process ``pid`` (on this machine) has exited: ``ray.kill`` returns before it does."""
    from pathlib import Path

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"store process {pid} did not exit")


@pytest.mark.cluster
def test_token_and_tls_reach_the_stores_and_the_decoders_source(shared, shipped_model, resident, tmp_path):
    import subprocess

    import grpc
    import ray

    from actors.grpc_source import GrpcConfig, GrpcSource

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    spec = DeploymentSpec(
        name="tls", namespace="tests", model=ModelSpec(path=str(shipped_model)),
        stores=StoreSpec(count=1, resources={"expert_store": 0.5}, max_restarts=0),
        transport=TransportSpec(kind="grpc", token="s3cret", tls_cert=str(cert), tls_key=str(key), server_name="localhost"),
        decoders=DecodersSpec(count=1, resources={"decoder": 0.5}, max_batch_size=4, config=SPECMOE),
        coordinator=CoordinatorSpec(max_batch_per_decoder=4, journal=str(tmp_path / "tls.journal")),
    )
    deployment = build_deployment(spec)
    try:
        assert ray.get(deployment.decoders[0].generate.remote(PROMPTS, PARAMS)) == resident
        assert ray.get(deployment.decoders[0].metrics.remote())["transport"]["bytes"] > 0
        source = deployment.source()  # the driver's source gets the same token and certificate
        assert source.fetch(0, [1])[1].result()[0].shape == (512, 128)
        source.close()
        address = deployment.stores.grpc_addresses[0]
        tls_only = GrpcConfig(root_cert=cert.read_bytes(), server_name="localhost")
        intruder = GrpcSource([address], tls_only, owners=deployment.stores.placement.owners)
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):  # TLS but no token: refused
            intruder.fetch(0, [1])[1].result()
        intruder.close()
    finally:
        deployment.shutdown()
