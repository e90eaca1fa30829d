"""A prepared directory repairs and resumes: corrupt or missing shards are rewritten, an
interrupted run picks up where it stopped, the dense part is replaced whole and only when it
differs, and a store that meets a corrupt shard names the command that fixes it."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from conftest import corrupt_copy
from actors.grpc_service import ExpertTable
from cluster.sources import prepared_dir
from deploy.cli import main as cli
from specmoe.shards import UNFINISHED, CorruptShardError, PrepareConfig, ShardReader, expert_file, prepare, verify_prepared
from specmoe.weights import Checkpoint
from specmoe.shards import fingerprint


@pytest.fixture(scope="module")
def prepared(shipped_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shipped"
    prepare(PrepareConfig(shipped_model, out, quantize="int4"), progress=False)
    return out


def stats(root) -> dict[str, tuple[int, int]]:
    """Every file's (inode, mtime): a rewritten file changes both."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def flip_in_place(root, layer: int, expert: int, tensor: str, scratch) -> str:
    bad = corrupt_copy(root, scratch, layer, expert, tensor)
    shutil.copyfile(bad, root / expert_file(layer, expert))
    return expert_file(layer, expert)


def test_rerun_rewrites_only_the_corrupt_and_missing_shards(prepared, shipped_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    corrupt = flip_in_place(out, 1, 4, "down.qdata", tmp_path / "scratch")
    missing = expert_file(2, 3)
    (out / missing).unlink()
    assert sorted(verify_prepared(out)) == sorted([corrupt, missing])
    before = stats(out)

    prepare(PrepareConfig(shipped_model, out, quantize="int4"), progress=False)

    assert verify_prepared(out) == []
    assert json.loads((out / "manifest.json").read_text()) == manifest
    after = stats(out)
    changed = {name for name in after if before.get(name) != after[name]}
    assert changed == {corrupt, missing}  # the dense part and every sound shard are left as they were


def test_an_interrupted_prepare_resumes_from_the_shards_it_wrote(shipped_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / UNFINISHED).write_text(fingerprint(Checkpoint(shipped_model)) + "\n")  # a run stopped at its start...
    obstacle = out / expert_file(2, 0)
    obstacle.mkdir(parents=True)  # ...then one that fails on a write halfway (a disk error)
    with pytest.raises(OSError):
        prepare(PrepareConfig(shipped_model, out), progress=False)
    assert not (out / "manifest.json").exists()
    written = {name: st for name, st in stats(out).items() if name.startswith("experts/") and name.endswith(".safetensors")}
    assert len(written) == 16  # layers 0 and 1

    obstacle.rmdir()
    manifest = prepare(PrepareConfig(shipped_model, out), progress=False)

    after = stats(out)
    assert {name: after[name] for name in written} == written  # resumed: not one of them written again
    assert len([n for n in after if n.startswith("experts/")]) == 32 and not (out / UNFINISHED).exists()
    fresh = prepare(PrepareConfig(shipped_model, tmp_path / "fresh"), progress=False)
    assert manifest["tensors"] == fresh["tensors"] and manifest["dense"] == fresh["dense"]
    assert verify_prepared(out) == []


def test_the_dense_part_is_replaced_whole_when_it_differs(prepared, shipped_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    dense = out / "dense" / "model.safetensors"
    data = bytearray(dense.read_bytes())
    data[-1] ^= 0xFF
    dense.write_bytes(bytes(data))
    assert verify_prepared(out) == ["dense/model.safetensors"]
    inode = dense.stat().st_ino

    prepare(PrepareConfig(shipped_model, out, quantize="int4"), progress=False)

    assert verify_prepared(out) == []
    assert dense.stat().st_ino != inode  # written beside it and renamed over it, never rewritten in place
    assert dense.read_bytes() == (prepared / "dense" / "model.safetensors").read_bytes()
    assert not list(out.rglob("*.tmp"))


def test_a_store_names_the_corrupt_file_and_the_command_that_rewrites_it(prepared, tmp_path):
    out = tmp_path / "out"
    corrupt_copy(prepared, out, 1, 4, "gate_up", offset=3)
    with pytest.raises(CorruptShardError) as err:
        ExpertTable(out)
    message = str(err.value)
    assert "L001-E004.safetensors" in message
    command = message.split("to rewrite it, run: ")[1]
    assert command == shlex.join(["specmoe", "prepare", str(ShardReader(prepared).manifest["source"]), str(out),
                                  "--quantize", "int4"])
    assert cli(shlex.split(command)[1:]) == 0  # the command as printed repairs the directory
    assert ExpertTable(out).keys == ShardReader(out).keys()


def test_the_shard_cache_is_verified_and_repaired_before_use(shipped_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECMOE_CACHE", str(tmp_path / "cache"))
    out = prepared_dir(shipped_model)
    corrupt = flip_in_place(out, 3, 7, "down", tmp_path / "scratch")

    assert prepared_dir(shipped_model) == out
    assert verify_prepared(out) == []
    assert corrupt in capsys.readouterr().err


def test_manifest_paths_stay_inside_the_directory(prepared, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tensors"][0]["file"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"outside its directory: '\.\./\.\./etc/passwd'"):
        ShardReader(out)
