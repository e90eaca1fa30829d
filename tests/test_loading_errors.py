"""Loading: sharded checkpoints, dtypes, and a clear error for every broken input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import shard_checkpoint
from specmoe.loader import load_model
from specmoe.models import UnsupportedModelError
from specmoe.weights import CheckpointError


def copy_with_tensors(src, dst, edit):
    """Copy a checkpoint, letting ``edit`` change its tensor dict."""
    shutil.copytree(src, dst)
    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_sharded_checkpoint_loads_identically(checkpoints, tmp_path):
    src = checkpoints[("mixtral", "per_expert")]
    single = load_model(src)
    sharded = load_model(shard_checkpoint(src, tmp_path / "sharded", shards=3))
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bf16_loads_as_bf16(checkpoints):
    model = load_model(checkpoints[("qwen3_moe", "fused")], "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_model_type_lists_supported(checkpoints, tmp_path):
    dst = tmp_path / "llama"
    shutil.copytree(checkpoints[("mixtral", "per_expert")], dst)
    config = json.loads((dst / "config.json").read_text())
    config["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*supported: mixtral, olmoe, qwen2_moe, qwen3_moe"):
        load_model(dst)


def test_missing_tensor_is_named(checkpoints, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    dst = copy_with_tensors(checkpoints[("mixtral", "per_expert")], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.2\.w3\.weight"):
        load_model(dst)


def test_missing_fused_tensor_is_named(checkpoints, tmp_path):
    name = "model.layers.0.mlp.experts.down_proj"
    dst = copy_with_tensors(checkpoints[("olmoe", "fused")], tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.mlp\.experts\.down_proj"):
        load_model(dst)


def test_unexpected_tensor_is_named(checkpoints, tmp_path):
    dst = copy_with_tensors(
        checkpoints[("qwen2_moe", "per_expert")], tmp_path / "m", lambda t: t.update({"model.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.extra\.weight"):
        load_model(dst)


def test_bad_shape_names_tensor_and_both_shapes(checkpoints, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    dst = copy_with_tensors(
        checkpoints[("mixtral", "per_expert")], tmp_path / "m", lambda t: t.update({name: torch.zeros(31, 32)})
    )
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*\(31, 32\).*\(32, 32\)"):
        load_model(dst)


def test_nonexistent_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_directory_without_weights(checkpoints, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    shutil.copy(checkpoints[("mixtral", "per_expert")] / "config.json", dst)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(dst)


def test_bad_dtype(checkpoints):
    with pytest.raises(ValueError, match="allowed: fp32, bf16"):
        load_model(checkpoints[("mixtral", "per_expert")], "fp16")
