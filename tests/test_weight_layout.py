"""Weights stored input-major: a loaded model's experts and projections keep their shapes and
values (those transformers loads) but live transposed in memory, so ``F.linear`` multiplies
them as one plain ``x @ w.t()``; fetched experts (row-major) keep their own matmul rule."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from specmoe.layers import expert_ffn, input_major
from specmoe.loader import load_model

H, I = 64, 96  # hidden, expert intermediate


def is_input_major(w: torch.Tensor) -> bool:
    return w.transpose(-1, -2).is_contiguous()


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_weights_are_input_major_with_the_checkpoint_values(family, checkpoints):
    path = checkpoints[(family, "per_expert")]
    ours = load_model(path, "fp32")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for _, block in ours.moe_blocks():
        for w in (block.experts.gate_up_proj, block.experts.down_proj):
            assert is_input_major(w), w.stride()
    attn = ours.model.layers[0].self_attn
    for name, w in [("q_proj", attn.q_proj.weight), ("o_proj", attn.o_proj.weight), ("lm_head", ours.lm_head.weight)]:
        assert is_input_major(w), (name, w.stride())
    for name, w in ours.state_dict().items():
        if name in reference:
            assert torch.equal(w, reference[name]), name


def test_input_major_has_the_asked_shape_and_transposed_strides():
    w = input_major(3, 5, 7)  # [E, out, in]
    assert w.shape == (3, 5, 7) and w.stride() == (35, 1, 5)


def input_major_weights(dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * I, H, generator=g).to(dtype).t().contiguous().t()  # [2I, H], stored [H, 2I]
    down = torch.randn(H, I, generator=g).to(dtype).t().contiguous().t()  # [H, I], stored [I, H]
    return gate_up, down


def linear_ffn(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@pytest.mark.parametrize("n", range(1, 13))
def test_input_major_experts_take_linear_at_every_token_count(n):
    gate_up, down = input_major_weights(torch.float32)
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(n))  # [n, H]
    out = expert_ffn(x, gate_up, down, F.silu)
    assert torch.equal(out, linear_ffn(x, gate_up, down))
    ref = linear_ffn(x.double(), gate_up.double(), down.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
