"""prepare, placement, the gRPC ExpertService and its clients (no Ray needed here)."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch

from conftest import REPO, corrupt_copy, rewrite_fused
from cluster.placement import plan_placement
from protos import expert_service_pb2 as pb2
from protos import expert_service_pb2_grpc as pb2_grpc
from actors.grpc_source import GrpcConfig, GrpcSource
from specmoe.expert_source import LocalSource
from actors.grpc_service import ExpertTable, ServerConfig, serve_experts
from specmoe.layers import expert_ffn
from specmoe.loader import load_model
from specmoe.models import model_class
from specmoe.shards import CorruptShardError, PrepareConfig, ShardReader, prepare
from specmoe.weights import Checkpoint, ExpertReader


@pytest.fixture(scope="module")
def shards(shipped_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "shipped"
    prepare(PrepareConfig(shipped_model, out, quantize="int4"), progress=False)
    return out


def checkpoint_experts(model_dir):
    reader = ExpertReader(Checkpoint(model_dir), model_class("mixtral").checkpoint_names)
    return {(layer, e): reader.read(layer, e) for layer in reader.layers for e in range(8)}


def test_prepare_splits_experts_exactly_and_keeps_a_loadable_dense_part(shards, shipped_model):
    reader = ShardReader(shards)
    expected = checkpoint_experts(shipped_model)
    assert reader.keys() == sorted(expected)
    for key, (gate_up, down) in expected.items():
        got = reader.read(*key)
        assert torch.equal(got[0], gate_up) and torch.equal(got[1], down)
        assert got[0].dtype == torch.bfloat16
    entry = reader.entries(0, 0)[0]
    assert set(entry) == {"layer", "expert", "name", "file", "dtype", "shape", "nbytes", "crc32"}
    dense = load_model(shards / "dense", experts=False)
    full = load_model(shipped_model)
    assert torch.equal(dense.model.layers[1].mlp.gate.weight, full.model.layers[1].mlp.gate.weight)


def test_prepare_is_idempotent_and_refuses_another_model(shards, checkpoints):
    before = (shards / "manifest.json").read_text()
    prepare(PrepareConfig(REPO / "models" / "shakespeare-tiny-moe", shards, quantize="int4"), progress=False)
    assert (shards / "manifest.json").read_text() == before
    with pytest.raises(ValueError, match="another model"):
        prepare(PrepareConfig(checkpoints[("mixtral", "per_expert")], shards), progress=False)


def test_prepare_reads_fused_checkpoints_and_converts_dtype(checkpoints, tmp_path):
    per_expert = checkpoints[("qwen2_moe", "per_expert")]
    fused = rewrite_fused(per_expert, tmp_path / "fused")
    a = ShardReader(prepare(PrepareConfig(per_expert, tmp_path / "a", dtype="bf16"), progress=False) and tmp_path / "a")
    b = ShardReader(prepare(PrepareConfig(fused, tmp_path / "b", dtype="bf16"), progress=False) and tmp_path / "b")
    assert a.keys() == b.keys() == [(layer, e) for layer in (0, 2) for e in range(6)]  # layer 1 is dense
    for key in a.keys():
        assert all(torch.equal(x, y) for x, y in zip(a.read(*key), b.read(*key)))
        assert a.read(*key)[0].dtype == torch.bfloat16


def test_quantized_copies_are_close_to_the_exact_ones(shards):
    reader = ShardReader(shards)
    gate_up, down = reader.read(2, 3)
    q_gate_up, q_down = reader.read_quantized(2, 3)
    for q, exact in ((q_gate_up, gate_up), (q_down, down)):
        assert q.bits == 4 and q.shape == tuple(exact.shape)
        err = (q.dequantize() - exact.float()).abs().max()
        assert err <= exact.float().abs().max() / 7  # within one int4 step of the largest group


def test_a_corrupted_byte_names_the_file_and_tensor(shards, tmp_path):
    bad = tmp_path / "bad"
    path = corrupt_copy(shards, bad, 1, 4, "down", offset=5)
    data = path.read_bytes()
    with pytest.raises(CorruptShardError, match=r"'down' of layer 1 expert 4 in .*L001-E004\.safetensors"):
        ExpertTable(bad)
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(CorruptShardError, match=r"L001-E004\.safetensors"):
        ExpertTable(bad, keys=[(1, 4)])


def test_placement_balances_bytes_and_spreads_replicas():
    sizes = {(layer, e): 100 + 10 * e for layer in range(4) for e in range(8)}
    plan = plan_placement(sizes, num_stores=3, replication=2)
    loads = plan.bytes_per_store(sizes)
    assert max(loads) - min(loads) <= max(sizes.values())
    assert all(len(set(o)) == 2 for o in plan.owners.values())
    assert sum(len(s) for s in plan.stores) == 2 * len(sizes)
    with pytest.raises(ValueError, match=r"replication must be in \[1, 3\]"):
        plan_placement(sizes, 3, 4)


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO), f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(REPO / "protos" / "expert_service.proto")],
        check=True,
    )
    for name in ("expert_service_pb2.py", "expert_service_pb2_grpc.py"):
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (REPO / "protos" / name).read_text(), f"protos/{name} is stale: regenerate it with grpc_tools.protoc"


# -- the gRPC service ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def table(shards):
    return ExpertTable(shards)


@pytest.fixture(scope="module")
def server(table):
    server, port = serve_experts(table, ServerConfig(token="s3cret", max_compute_tokens=64))
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def stub(address):
    return pb2_grpc.ExpertServiceStub(grpc.insecure_channel(address))


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)], ids=["missing", "wrong"])
def test_calls_without_the_right_token_are_unauthenticated(server, metadata):
    for call in (lambda s: s.Health(pb2.HealthRequest(), metadata=metadata),
                 lambda s: list(s.Fetch(pb2.FetchRequest(layer=0, experts=[0]), metadata=metadata))):
        with pytest.raises(grpc.RpcError) as err:
            call(stub(server))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_expert_is_not_found(server):
    source = GrpcSource([server], GrpcConfig(token="s3cret"))
    with pytest.raises(KeyError, match="no store holds expert 9 of layer 0"):
        source.fetch(0, [9])[9].result()
    with pytest.raises(grpc.RpcError) as err:
        list(stub(server).Fetch(pb2.FetchRequest(layer=7, experts=[0]), metadata=(("authorization", "Bearer s3cret"),)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "layer 7" in err.value.details()
    source.close()


def test_oversized_compute_is_invalid_argument(server):
    source = GrpcSource([server], GrpcConfig(token="s3cret"))
    with pytest.raises(grpc.RpcError) as err:
        source.compute(0, 1, torch.zeros(65, 128)).result()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 64" in err.value.details()
    source.close()


def test_compute_on_the_store_equals_the_local_expert_forward(server, shipped_model):
    source = GrpcSource([server], GrpcConfig(token="s3cret"))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    gate_up, down = checkpoint_experts(shipped_model)[(3, 6)]
    local = expert_ffn(x, gate_up.float(), down.float(), torch.nn.functional.silu)
    remote = source.compute(3, 6, x).result()
    torch.testing.assert_close(remote, local, atol=0, rtol=0)
    source.close()


def test_grpc_fetch_is_byte_identical_and_counted(server, shipped_model):
    source = GrpcSource([server], GrpcConfig(token="s3cret", chunk_bytes=64 << 10))
    expected = checkpoint_experts(shipped_model)
    for layer in range(4):
        got = source.fetch(layer, list(range(8)))
        for e, future in got.items():
            assert all(torch.equal(a, b) for a, b in zip(future.result(), expected[(layer, e)]))
    m = source.metrics.snapshot()
    assert m["requests"] == 32 and m["calls"] == 4
    assert m["bytes"] == sum(a.nbytes + b.nbytes for a, b in expected.values())
    assert sum(m["latency_histogram"].values()) == 32  # one latency per expert
    source.close()


def test_tls_round_trip_with_a_self_signed_certificate(table, tmp_path, shipped_model):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server, port = serve_experts(table, ServerConfig(tls_cert=str(cert), tls_key=str(key), token="t"))
    try:
        source = GrpcSource([f"127.0.0.1:{port}"], GrpcConfig(token="t", root_cert=cert.read_bytes(), server_name="localhost"))
        gate_up, down = source.fetch(1, [2])[2].result()
        assert torch.equal(gate_up, checkpoint_experts(shipped_model)[(1, 2)][0])
        source.close()
        with pytest.raises(grpc.RpcError):  # a plaintext client cannot talk to the TLS server
            stub(f"127.0.0.1:{port}").Health(pb2.HealthRequest(), timeout=5)
    finally:
        server.stop(grace=None)


def test_local_source_checks_bytes(shards):
    source = LocalSource(shards)
    gate_up, _ = source.fetch(0, [1])[1].result()
    assert gate_up.shape == (512, 128)
    assert json.loads((shards / "manifest.json").read_text())["format"] == "specmoe-shards/1"


def test_remote_compute_gives_the_same_tokens(server, shipped_model):
    from specmoe.config import DecoderConfig, EngineConfig
    from specmoe.engine import Engine
    from specmoe.sampling import SamplingParams

    prompts = [[5, 17, 99, 4], [300, 2, 41]]
    params = SamplingParams(max_new_tokens=16)
    want = [o.token_ids for o in Engine(EngineConfig(model=shipped_model, max_batch_size=2)).generate(prompts, params)]
    for mode in ("ondemand", "specmoe"):
        source = GrpcSource([server], GrpcConfig(token="s3cret"))
        decoder = DecoderConfig(mode=mode, k=2, remote_compute=True)
        engine = Engine(EngineConfig(model=shipped_model, max_batch_size=2, decoder=decoder), fetch=source)
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
        assert engine.runtime.counters.remote_computes > 0
        source.close()


def test_remote_compute_needs_a_source_that_computes(shipped_model):
    from specmoe.config import DecoderConfig, EngineConfig
    from specmoe.engine import Engine

    with pytest.raises(ValueError, match="remote_compute needs a source"):
        Engine(EngineConfig(model=shipped_model, decoder=DecoderConfig(mode="ondemand", remote_compute=True)))


def test_a_retrained_model_of_the_same_shape_has_another_fingerprint(checkpoints, tmp_path):
    from conftest import save_random_checkpoint
    from specmoe.shards import fingerprint

    a = save_random_checkpoint("mixtral", tmp_path / "a", seed=1)
    b = save_random_checkpoint("mixtral", tmp_path / "b", seed=2)
    assert fingerprint(Checkpoint(a)) != fingerprint(Checkpoint(b))
    assert fingerprint(Checkpoint(a)) == fingerprint(Checkpoint(save_random_checkpoint("mixtral", tmp_path / "c", seed=1)))
    prepare(PrepareConfig(a, tmp_path / "shards"), progress=False)
    with pytest.raises(ValueError, match="another model"):
        prepare(PrepareConfig(b, tmp_path / "shards"), progress=False)
