"""Shared fixtures: tiny random checkpoints of every family, made with transformers at test time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# before anything imports Ray: nodes and drivers stay on 127.0.0.1
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHIPPED_MODEL = REPO / "models" / "shakespeare-tiny-moe"

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def family_configs():
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "mixtral": MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4),
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON,
            intermediate_size=40,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=56,
            num_experts=6,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            intermediate_size=40,
            moe_intermediate_size=24,
            num_experts=6,
            norm_topk_prob=True,
            attention_bias=True,
            head_dim=16,
        ),
        "olmoe": OlmoeConfig(**COMMON, intermediate_size=24, num_experts=6, clip_qkv=0.5),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
NAMINGS = ["per_expert", "fused"]


def save_random_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """A random checkpoint saved by transformers (which writes the Hub's per-expert names);
    ``overrides`` change the family's tiny config (``hidden_size=80``, ``vocab_size=16``, ...)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_configs()[family]
    for name, value in overrides.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


def rewrite_fused(src: Path, out: Path) -> Path:
    """The same weights under transformers v5's fused expert names (``mlp.experts.gate_up_proj``)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "expected v5 fused expert names"
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def shard_checkpoint(src: Path, out: Path, shards: int = 2) -> Path:
    """Split a single-file checkpoint into ``shards`` files with a ``model.safetensors.index.json``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(family, naming) -> checkpoint directory, for every family in both namings."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for family in FAMILIES:
        per_expert = save_random_checkpoint(family, root / family / "per_expert")
        out[(family, "per_expert")] = per_expert
        out[(family, "fused")] = rewrite_fused(per_expert, root / family / "fused")
    return out


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    assert (SHIPPED_MODEL / "config.json").exists(), f"the shipped model is missing at {SHIPPED_MODEL}"
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def shards(shipped_model, tmp_path_factory) -> Path:
    """The shipped model prepared for expert stores (read-only: a test that corrupts one copies it)."""
    from specmoe.shards import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("shipped-shards") / "shipped"
    prepare(PrepareConfig(shipped_model, out), progress=False)
    return out


@pytest.fixture(scope="session")
def expected(shipped_model) -> dict:
    """(layer, expert) -> (gate_up, down) of the shipped model, read from its checkpoint."""
    from specmoe.models import model_class
    from specmoe.weights import Checkpoint, ExpertReader

    reader = ExpertReader(Checkpoint(shipped_model), model_class("mixtral").checkpoint_names)
    return {(layer, e): reader.read(layer, e) for layer in reader.layers for e in range(8)}


def pytest_collection_modifyitems(config, items):
    """GPU tests need CUDA; everywhere else they are reported as skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (run them where one exists)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def corrupt_copy(shards: Path, out: Path, layer: int, expert: int, tensor: str, offset: int = 0) -> Path:
    """A copy of a prepared directory with one byte of one expert tensor flipped; returns the shard file."""
    from specmoe.shards import ShardReader

    shutil.copytree(shards, out)
    entry = next(e for e in ShardReader(out).entries(layer, expert) if e["name"] == tensor)
    path = out / entry["file"]
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"]
    data[8 + header_len + start + offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path
