"""The wire format of Fetch, checks of received bytes, `specmoe prepare` and `specmoe cluster up/down`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from protos import expert_service_pb2 as pb2
from deploy.cli import main as cli
from actors.grpc_source import GrpcConfig, GrpcSource
from specmoe.expert_source import ExpertUnavailableError
from actors.grpc_service import ExpertTable, ServerConfig, serve_experts
from specmoe.shards import UNFINISHED, CorruptShardError, PrepareConfig, ShardReader, prepare
from specmoe.tensor_wire import decode_chunk, encode_chunks, varint


@pytest.fixture(scope="module")
def shards(shipped_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("transport") / "shipped"
    prepare(PrepareConfig(shipped_model, out), progress=False)
    return out


@pytest.mark.parametrize("n", [1, 127, 128, 300, 2**20, 2**35])
def test_varint_matches_protobuf(n):
    assert varint(n) == pb2.TensorChunk(offset=n).SerializeToString()[1:]  # after the tag of field 5


def test_hand_encoded_chunks_are_what_protobuf_reads():
    info = pb2.TensorInfo(layer=3, expert=0, name="down", dtype="bfloat16", shape=[4, 5], nbytes=2500, crc32=7)
    data = bytes(range(256)) * 9 + bytes(196)  # 2500 bytes: chunks of 1000, 1000, 500
    messages = list(encode_chunks(info, memoryview(data), 1000))
    assert len(messages) == 3
    parsed = [pb2.TensorChunk.FromString(m) for m in messages]  # what a generated stub reads
    assert [p.offset for p in parsed] == [0, 1000, 2000]
    assert b"".join(p.data for p in parsed) == data
    assert parsed[0].info == info and not parsed[1].HasField("info")
    assert all(p.layer == 3 and p.expert == 0 and p.name == "down" for p in parsed)
    decoded = [decode_chunk(m) for m in messages]  # what GrpcSource reads, without copying the data
    assert [(c.expert, c.name, c.offset) for c in decoded] == [(0, "down", 0), (0, "down", 1000), (0, "down", 2000)]
    assert b"".join(bytes(c.data) for c in decoded) == data
    assert decoded[0].info == info and decoded[2].info is None
    with pytest.raises(ValueError, match="wire type 5"):
        decode_chunk(bytes([3 << 3 | 5]) + bytes(4))


def test_received_bytes_are_checked_against_the_manifest(shards):
    table = ExpertTable(shards, keys=[(2, 1)])
    table.tensors[(2, 1)]["down"] = table.tensors[(2, 1)]["down"].clone()
    table.tensors[(2, 1)]["down"][0, 0] += 1  # the store's memory goes bad after its start-up check
    server, port = serve_experts(table, ServerConfig())
    try:
        checked = GrpcSource([f"127.0.0.1:{port}"])
        with pytest.raises(CorruptShardError, match=r"layer 2 expert 1 tensor 'down'"):
            checked.fetch(2, [1])[1].result()
        unchecked = GrpcSource([f"127.0.0.1:{port}"], GrpcConfig(chunk_bytes=96 << 10), verify=False)
        gate_up, down = unchecked.fetch(2, [1])[1].result()  # a chunk size other than the server's: encoded per call
        assert torch.equal(down, table.tensors[(2, 1)]["down"])
        assert torch.equal(gate_up, ShardReader(shards).read(2, 1)[0])
        checked.close()
        unchecked.close()
    finally:
        server.stop(grace=None)


def test_grpc_fails_over_to_a_replica_and_names_what_no_store_answered(shards):
    table = ExpertTable(shards, keys=[(0, e) for e in range(8)])
    servers = [serve_experts(table, ServerConfig()) for _ in range(2)]
    addresses = [f"127.0.0.1:{port}" for _, port in servers]
    replicated = GrpcSource(addresses, GrpcConfig(deadline_s=5), owners={(0, e): (0, 1) for e in range(8)})
    single = GrpcSource(addresses[:1], GrpcConfig(deadline_s=5))  # owners learned from the Manifest
    assert set(single.owners) == {(0, e) for e in range(8)}
    try:
        servers[0][0].stop(grace=None)  # the primary does not answer any more
        got = replicated.fetch(0, [1, 6])
        assert all(torch.equal(got[e].result()[0], table.tensors[(0, e)]["gate_up"]) for e in (1, 6))
        assert replicated.metrics.failovers == 1
        with pytest.raises(ExpertUnavailableError, match=r"experts \[2\] of layer 0: no store answered"):
            single.fetch(0, [2])[2].result()
    finally:
        for source in (replicated, single):
            source.close()
        servers[1][0].stop(grace=None)


def test_prepare_command_resumes_verifies_and_refuses(shipped_model, checkpoints, tmp_path, capsys):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / UNFINISHED).write_text("another-model\n")
    (out / "stray").write_text("x")
    assert cli(["prepare", str(shipped_model), str(out)]) == 2  # an interrupted run of another model
    assert "holds no manifest of this model" in capsys.readouterr().err

    (out / "stray").unlink()
    (out / UNFINISHED).unlink()
    assert cli(["prepare", str(shipped_model), str(out)]) == 0
    err = capsys.readouterr().err
    assert "32/32" in err and "expert tensors" in err  # the progress bar, then the summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / UNFINISHED).exists()
    assert {"name", "dtype", "shape", "nbytes", "crc32"} <= set(manifest["tensors"][0])
    assert (out / "dense" / "config.json").exists() and (out / "dense" / "tokenizer.json").exists()

    assert cli(["prepare", str(shipped_model), str(out)]) == 0  # verified, skipped, same manifest
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert cli(["prepare", str(shipped_model), str(out), "--dtype", "fp32"]) == 2
    assert "other options" in capsys.readouterr().err
    assert cli(["prepare", str(checkpoints[("mixtral", "per_expert")]), str(out)]) == 2
    assert "another model" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_streams_a_checkpoint_larger_than_what_it_holds(tmp_path):
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    hidden, inter, experts = 1024, 4096, 16  # 24 MiB per expert, 384 MiB in all
    model = tmp_path / "big"
    MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=64).save_pretrained(model)
    prefix = "model.layers.0.block_sparse_moe"
    tensors = {f"{prefix}.gate.weight": torch.zeros(experts, hidden, dtype=torch.bfloat16)}
    for e in range(experts):
        for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            tensors[f"{prefix}.experts.{e}.{name}.weight"] = torch.full(shape, e, dtype=torch.bfloat16)
    save_file(tensors, model / "model.safetensors")
    del tensors
    code = (
        "import resource, sys; from specmoe.shards import PrepareConfig, prepare; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "prepare(PrepareConfig(sys.argv[1], sys.argv[2]), progress=False); "
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert int(run.stdout.strip()) < 128  # MiB of peak memory added: a few experts, never the 384 MiB
    assert torch.equal(ShardReader(tmp_path / "out").read(0, 11)[1], torch.full((hidden, inter), 11, dtype=torch.bfloat16))


def resources(address: str) -> dict:
    """Connect from another process (this one may be connected to another cluster)."""
    code = ("import json, cluster, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps({'resources': ray.cluster_resources(), 'ips': sorted({n['NodeManagerAddress'] "
            "for n in ray.nodes() if n['Alive']})}))" % address)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.cluster
def test_cluster_up_and_down(capsys):
    from cluster.local import cluster_processes

    port = 6479
    assert not cluster_processes(port)
    assert cli(["cluster", "up", "--stores", "2", "--decoders", "1", "--object-store-mb", "100", "--port", str(port)]) == 0
    try:
        address = capsys.readouterr().out.strip()
        assert address == f"127.0.0.1:{port}"
        got = resources(address)
        assert got["resources"]["expert_store"] == 2 and got["resources"]["decoder"] == 1
        assert got["ips"] == ["127.0.0.1"]
        assert cli(["cluster", "up", "--port", str(port)]) == 2  # one cluster per port
        assert "is running" in capsys.readouterr().err
    finally:
        assert cli(["cluster", "down", "--port", str(port)]) == 0
    assert "stopped" in capsys.readouterr().err
    assert not cluster_processes(port)
    assert cli(["cluster", "down", "--port", str(port)]) == 0
    assert "none running" in capsys.readouterr().err
