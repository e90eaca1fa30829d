"""The experts' small-token matmul: 2 to 8 tokens run as ``torch.mm(W, x.t())``, the rest as
``F.linear``; both compute the same gated FFN."""

import pytest
import torch
import torch.nn.functional as F

from specmoe.layers import SMALL_EXPERT_TOKENS, expert_ffn

H, I = 64, 96  # hidden, expert intermediate


def weights(dtype):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * I, H, generator=g).to(dtype)  # [2I, H]
    down = torch.randn(H, I, generator=g).to(dtype)  # [H, I]
    return gate_up, down


def linear_ffn(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def weight_left_ffn(x, gate_up, down):
    gate, up = torch.mm(gate_up, x.t()).t().chunk(2, dim=-1)  # [n, I]
    return torch.mm(down, (F.silu(gate) * up).t()).t()


def test_small_expert_range_is_two_to_eight_tokens():
    assert list(SMALL_EXPERT_TOKENS) == [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("n", range(1, 13))
def test_each_token_count_takes_its_path(n):
    gate_up, down = weights(torch.float32)
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(n))  # [n, H]
    path = weight_left_ffn if n in SMALL_EXPERT_TOKENS else linear_ffn
    assert torch.equal(expert_ffn(x, gate_up, down, F.silu), path(x, gate_up, down))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16_rounding"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_weight_left_path_computes_the_gated_ffn(n, dtype, tol):
    gate_up, down = weights(dtype)
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(n)).to(dtype)  # [n, H]
    ref = linear_ffn(x.double(), gate_up.double(), down.double())
    out = expert_ffn(x, gate_up, down, F.silu)
    assert out.shape == (n, H) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
