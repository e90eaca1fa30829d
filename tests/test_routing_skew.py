"""Routing skew measures: hand-computed values, and routes recorded through the engine equal transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.profile import RoutingProfile, distinct_experts, gini, record_routes, top_share


def test_top_share_and_gini_by_hand():
    assert top_share([5] * 10) == pytest.approx(0.2) and gini([5] * 10) == pytest.approx(0.0)
    assert top_share([0, 0, 9, 0, 0]) == 1.0 and gini([0, 0, 9, 0, 0]) == pytest.approx(1.0)
    assert top_share([1, 3, 0, 0, 0]) == pytest.approx(0.75)  # one expert of five: the busiest
    # eight experts: 20% is 1.6 experts, the busiest and 0.6 of the next
    assert top_share([4, 2, 1, 1, 0, 0, 0, 0]) == pytest.approx((4 + 0.6 * 2) / 8)
    # ascending 1, 2, 3, 4: G = (-3*1 - 1*2 + 1*3 + 3*4) / (4 * 10) = 1/4, normalised by 3/4
    assert gini([3, 1, 4, 2]) == pytest.approx(1 / 3)
    profile = RoutingProfile("mixtral", 5, {0: [1, 3, 0, 0, 0]})
    assert profile.skew(0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no picks"):
        top_share([0, 0])
    with pytest.raises(ValueError, match="fraction"):
        top_share([1, 2], fraction=0)
    with pytest.raises(ValueError, match="two experts"):
        gini([3])


def test_distinct_experts_by_hand():
    gen = torch.Generator().manual_seed(0)
    same = torch.tensor([[0, 1]] * 10)  # [N, K]: every token picks experts 0 and 1
    assert distinct_experts(same, 8, 1, 20, gen) == 2.0 and distinct_experts(same, 8, 10, 20, gen) == 2.0
    disjoint = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])  # no two tokens share an expert
    assert distinct_experts(disjoint, 8, 3, 20, gen) == 6.0 and distinct_experts(disjoint, 8, 4, 20, gen) == 8.0
    with pytest.raises(ValueError, match="batch must be in"):
        distinct_experts(disjoint, 8, 5, 20, gen)


def test_recorded_routes_are_the_models_routing(shipped_model):
    engine = Engine(EngineConfig(model=shipped_model, max_batch_size=1, decoder=DecoderConfig(mode="resident")))
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\nJULIET:\nAy me!"
    ids = engine.encode(text)
    windows = [ids[:9], ids[9:]]
    routes = record_routes(engine, windows)  # layer -> [N, K]
    hf = AutoModelForCausalLM.from_pretrained(shipped_model, dtype=torch.float32).eval()
    k = hf.config.num_experts_per_tok
    with torch.no_grad():
        per_window = [hf(torch.tensor([w]), output_router_logits=True).router_logits for w in windows]
    assert sorted(routes) == list(range(hf.config.num_hidden_layers))
    for layer, indices in routes.items():
        logits = torch.cat([r[layer].reshape(len(w), -1) for r, w in zip(per_window, windows)])  # [N, E]
        expected = logits.softmax(-1).topk(k, dim=-1).indices
        assert torch.equal(indices.sort(dim=-1).values, expected.sort(dim=-1).values)
