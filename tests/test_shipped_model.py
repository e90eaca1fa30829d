"""The shipped model: loads, generates, matches transformers; the CLI streams only text."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from specmoe.config import EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams

PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nWe are", "KING RICHARD III:\n"]


def test_shipped_model_matches_transformers_greedy(shipped_model):
    hf = AutoModelForCausalLM.from_pretrained(shipped_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(shipped_model)
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=len(PROMPTS)))
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=48))
    for text, out in zip(PROMPTS, outs):
        ids = tok.encode(text, add_special_tokens=False)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids) :].tolist()
        assert out.token_ids == ref
        assert out.text == tok.decode(ref, skip_special_tokens=True)
    assert any(len(o.text.strip()) > 20 for o in outs)


def test_shipped_model_is_small_and_described(shipped_model):
    size = sum(f.stat().st_size for f in shipped_model.iterdir())
    assert size < 12 * 2**20
    card = (shipped_model / "README.md").read_text()
    assert "python -m specmoe.tools.train_tiny" in card and "validation" in card


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_streams_only_the_text_to_stdout(shipped_model):
    tok = AutoTokenizer.from_pretrained(shipped_model)
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=1))
    expected = engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=20))[0]
    proc = run_cli("generate", "--prompt", "ROMEO:", "--max-new-tokens", "20", "--mode", "specmoe", "--k", "2")
    assert proc.returncode == 0, proc.stderr
    # the streamed text is the shipped tokenizer's decoding of the 20 resident tokens, nothing else
    assert len(expected.token_ids) == 20 and proc.stdout == tok.decode(expected.token_ids, skip_special_tokens=True) + "\n"
    assert "tokens_per_s" in proc.stderr and "acceptance_rate" in proc.stderr


def test_cli_reports_bad_input_clearly(shipped_model, tmp_path):
    proc = run_cli("generate", "--prompt", "x", "--temperature", "-1")
    assert proc.returncode == 2 and "temperature must be" in proc.stderr and proc.stdout == ""
    proc = run_cli("generate", "--prompt", "x", "--model", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("generate", "--prompt", "x", "--k", "many")
    assert proc.returncode == 2 and "--k must be an integer or 'auto'" in proc.stderr


@pytest.mark.cluster
def test_cli_with_experts_on_a_local_ray_cluster_prints_the_resident_text(shipped_model, tmp_path):
    """The demo path: shards prepared into a cache, a cluster started, experts fetched over Ray."""
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=1))
    expected = engine.generate(["ROMEO:"], SamplingParams(max_new_tokens=24))[0].text
    env = {"SPECMOE_CACHE": str(tmp_path / "cache")}
    proc = run_cli("generate", "--prompt", "ROMEO:", "--max-new-tokens", "24", "--mode", "specmoe", "--experts", "ray", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"
    assert "expert_bytes_moved" in proc.stderr
