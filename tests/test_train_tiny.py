"""The training script of the shipped model: loads in transformers, deterministic under a seed."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED
from specmoe.tools.train_tiny import TrainConfig, run

CORPUS = SHARED / "data" / "tinyshakespeare.txt"


def tiny(out, tmp_path) -> TrainConfig:
    assert CORPUS.exists(), f"the training corpus is missing at {CORPUS}"
    small = tmp_path / "corpus.txt"
    small.write_text(CORPUS.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return TrainConfig(
        corpus=str(small), out=str(out), vocab_size=300, hidden_size=32, intermediate_size=32, num_layers=2,
        num_experts=4, num_heads=2, num_kv_heads=1, seq_len=32, batch_size=4, steps=3, eval_windows=4,
    )


def test_training_output_loads_and_is_deterministic(tmp_path):
    run(tiny(tmp_path / "a", tmp_path))
    run(tiny(tmp_path / "b", tmp_path))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in a)  # Hub per-expert names

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    text = "ROMEO:\nWhat, ho!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level: exact round trip
    assert tok.eos_token_id == 0 and model.config.num_local_experts == 4
    assert "validation" in (tmp_path / "a" / "README.md").read_text()
