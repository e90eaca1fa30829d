"""The training script of the shipped model, at toy size: loads in transformers, deterministic under a seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from specmoe.tools.train_tiny import (
    SAMPLE_PROMPT,
    TrainConfig,
    lr_at,
    main,
    parse_args,
    run,
    split_corpus,
    verify,
)

# The shared data folder sits beside the repository checkout.
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    assert CORPUS.is_file(), (
        f"the Tiny Shakespeare corpus is missing: expected {CORPUS} (the shared/ folder beside the repository)"
    )
    small = tmp_path / "corpus.txt"
    small.write_text(CORPUS.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return small


def tiny(corpus: Path, out: Path, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        corpus=str(corpus), out=str(out), seed=seed, vocab_size=300, hidden_size=32, intermediate_size=32,
        num_layers=2, num_experts=4, top_k=2, num_heads=2, num_kv_heads=1, max_positions=64, seq_len=32,
        batch_size=4, steps=3, warmup=1, eval_windows=4,
    )


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def test_training_output_loads_and_is_deterministic(small_corpus, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    summary = run(tiny(small_corpus, a))
    run(tiny(small_corpus, b))
    run(tiny(small_corpus, c, seed=1))

    wa, wb, wc = weights(a), weights(b), weights(c)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in wa  # Hub-style per-expert names
    assert all(t.dtype == torch.bfloat16 for t in wa.values())

    model = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    assert model.config.output_router_logits is False
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0 and len(tok) == 300
    assert model.generation_config.eos_token_id == 0 and model.generation_config.pad_token_id == 0
    text = "ROMEO:\nWhat, ho!  Juliet -- 'tis I.\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: exact round trip

    assert summary["steps"] == 3 and summary["validation_loss"] > 0
    assert json.loads((a / "training.json").read_text())["config"]["seed"] == 0
    card = (a / "README.md").read_text()
    assert "python -m specmoe.tools.train_tiny" in card and "Validation loss" in card
    sample = verify(a, max_new_tokens=5)  # reloads in transformers, seeded sample
    assert sample.startswith(SAMPLE_PROMPT) and len(sample) > len(SAMPLE_PROMPT)
    assert verify(b, max_new_tokens=5) == sample  # same weights, same seed: same text


def test_command_line(small_corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    # The command line fixes the architecture, so keep the corpus and the run tiny instead.
    assert main(["--corpus", str(small_corpus), "--out", str(out), "--steps", "1", "--eval-windows", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert "--steps 1" in (out / "README.md").read_text()


def test_command_line_architecture(small_corpus, tmp_path, capsys):
    # Defaults are the shipped model's recipe; every architecture flag reaches the model.
    assert parse_args(["--corpus", "c", "--out", "o"]) == TrainConfig(corpus="c", out="o")
    out = tmp_path / "arch"
    argv = ["--corpus", str(small_corpus), "--out", str(out), "--steps", "2", "--eval-windows", "1",
            "--vocab-size", "300", "--hidden-size", "48", "--intermediate-size", "16", "--num-layers", "3",
            "--num-experts", "16", "--top-k", "3", "--num-heads", "4", "--num-kv-heads", "2",
            "--max-positions", "64", "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--aux-loss", "0",
            "--threads", "1"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    expected = {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 16, "num_hidden_layers": 3,
                "num_local_experts": 16, "num_experts_per_tok": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "router_aux_loss_coef": 0.0}
    assert {k: config[k] for k in expected} == expected
    trained = json.loads((out / "training.json").read_text())["config"]
    assert (trained["seq_len"], trained["batch_size"], trained["warmup"], trained["threads"]) == (32, 2, 1, 1)
    card = (out / "README.md").read_text()
    assert card.startswith("# arch\n") and "| 16 / 3 |" in card and "--num-experts 16" in card
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-experts", "8", "--top-k", "9"], "top_k"),
        (["--num-experts", "0"], "num_experts"),
        (["--hidden-size", "130"], "num_heads"),
        (["--num-kv-heads", "3"], "num_kv_heads"),
        (["--vocab-size", "100"], "vocab_size"),
        (["--aux-loss", "-1"], "aux_loss"),
        (["--seq-len", "1024"], "max_positions"),
    ],
)
def test_command_line_rejects_bad_architecture(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--corpus", "c", "--out", "o", *flags])
    assert message in capsys.readouterr().err


def test_split_and_schedule():
    train, val = split_corpus("x" * 100)
    assert (len(train), len(val)) == (95, 5)
    cfg = TrainConfig(corpus="", out="", steps=100, warmup=10, lr=1e-2, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-3) and lr_at(9, cfg) == pytest.approx(1e-2)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))
