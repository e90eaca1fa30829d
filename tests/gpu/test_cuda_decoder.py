"""The decoder on CUDA: dense weights, expert cache and shadow on the GPU, fetched experts
copied through pinned memory on a side stream. Runs only where CUDA exists."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.sampling import SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def tokens(path, device, decoder, dtype="fp32"):
    engine = Engine(EngineConfig(model=path, device=device, dtype=dtype, max_batch_size=3, decoder=decoder))
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize(
    "decoder",
    [DecoderConfig(mode="resident"), DecoderConfig(mode="pregate"), DecoderConfig(mode="specmoe", k=3, shadow_group_size=8)],
    ids=["resident", "pregate", "specmoe-shadow"],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_greedy_tokens_equal_cpu(family, decoder, checkpoints):
    path = checkpoints[(family, "per_expert")]
    cpu, _ = tokens(path, "cpu", decoder)
    gpu, engine = tokens(path, "cuda", decoder)
    assert gpu == cpu
    assert next(engine.model.parameters()).device.type == "cuda"
    if engine.runtime is not None:
        cached = [v for v, _ in engine.runtime.cache.entries.values()]
        assert all(t.device.type == "cuda" for pair in cached for t in pair)


def test_cuda_bf16_logits_close_to_fp32_within_bf16_tolerance(checkpoints):
    path = checkpoints[("mixtral", "per_expert")]
    logits = {}
    for dtype in ("fp32", "bf16"):
        engine = Engine(EngineConfig(model=path, device="cuda", dtype=dtype, max_batch_size=1))
        batch = engine.cache.batch([engine.cache.allocate()], [len(PROMPTS[0])])
        with torch.inference_mode():
            logits[dtype] = engine.model(torch.tensor(PROMPTS[0], device="cuda"), batch, engine.cache).cpu()
    torch.testing.assert_close(logits["bf16"], logits["fp32"], atol=3e-2, rtol=0)
