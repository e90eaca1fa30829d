"""The many-expert benchmark model (64 experts, top-2): matches transformers, and every mode gives resident's tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams

MODEL = REPO / "models" / "shakespeare-moe-64x2"
PROMPTS = ["ROMEO:\nBut soft, what light", "KING RICHARD III:\n"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir():
    assert (MODEL / "config.json").exists(), f"the many-expert model is missing at {MODEL}"
    return MODEL


def test_matches_transformers_greedy(model_dir):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(EngineConfig(model=model_dir, max_batch_size=len(PROMPTS)))
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    for text, out in zip(PROMPTS, outs):
        ids = tok.encode(text, add_special_tokens=False)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids) :].tolist()
        assert out.token_ids == ref


@pytest.mark.parametrize("decoder", [DecoderConfig(mode="ondemand"), DecoderConfig(mode="specmoe", k=3)],
                         ids=["ondemand", "specmoe-k3"])
def test_offloaded_modes_give_resident_tokens(model_dir, decoder):
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    resident = Engine(EngineConfig(model=model_dir, max_batch_size=len(PROMPTS))).generate(PROMPTS, params)
    engine = Engine(EngineConfig(model=model_dir, max_batch_size=len(PROMPTS), decoder=decoder))
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == [o.token_ids for o in resident]


def test_is_small_and_described(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (64, 2)
    assert sum(f.stat().st_size for f in model_dir.iterdir()) < 25 * 2**20
    card = (model_dir / "README.md").read_text()
    assert "python -m specmoe.tools.train_tiny" in card and "--num-experts 64" in card and "skew" in card
