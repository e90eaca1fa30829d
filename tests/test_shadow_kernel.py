"""Shadow copies multiplied in their packed int4 form (no dequantized copy, no per-round work)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specmoe.config import DecoderConfig, EngineConfig
from specmoe.engine import Engine
from specmoe.quant import PackedInt4, pack_int4_for_cpu, packed_ffn, quantize
from specmoe.sampling import SamplingParams

from test_draft_policies import DelayedSource


@pytest.mark.parametrize("rows, cols", [(96, 32), (32, 48), (80, 80), (1536, 256)])
def test_packed_matmul_multiplies_by_the_int4_copy(rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    q = quantize(w, 4, 32)
    packed = pack_int4_for_cpu(q)
    assert packed is not None and packed.shape == (rows, cols)
    # its weights are the int4 copy's, the scale rounded to bf16: within 8 values x 2^-8 of a step
    step = q.scales.float().repeat_interleave(32, dim=1)[:, :cols]  # [R, C]
    assert torch.all((packed.dequantize() - q.dequantize()).abs() <= step / 32 + 1e-7)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(1))  # [n, C]
    reference = x @ packed.dequantize().t()  # [n, R], fp32
    # bf16 activations: each product off by at most 2^-8 of itself, so the sum by 2^-8 of the sum of |products|
    bound = (x.abs() @ packed.dequantize().abs().t()) * 2**-8 * 1.5 + 1e-5
    assert torch.all((packed.linear(x) - reference).abs() <= bound)


def test_packed_expert_ffn_matches_the_dequantized_one():
    gen = torch.Generator().manual_seed(2)
    gate_up, down = torch.randn(96, 32, generator=gen) / 4, torch.randn(32, 48, generator=gen) / 4
    g, d = pack_int4_for_cpu(quantize(gate_up)), pack_int4_for_cpu(quantize(down))
    x = torch.randn(7, 32, generator=gen)
    gate, up = F.linear(x, g.dequantize()).chunk(2, dim=-1)
    reference = F.linear(F.silu(gate) * up, d.dequantize())
    assert torch.allclose(packed_ffn(x, g, d, F.silu), reference, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("bits, group, rows", [(8, 32, 96), (4, 16, 96), (4, 32, 40)])
def test_no_packed_form_where_the_kernel_does_not_take_it(bits, group, rows):
    """int8, a group size other than 32/64/128/256, rows not a multiple of 16: dequantized instead."""
    assert pack_int4_for_cpu(quantize(torch.randn(rows, 64), bits, group)) is None


def test_the_shadow_draft_holds_no_dequantized_copy(checkpoints):
    """Packed shadows (int4, groups of 32, on the CPU): drafts run on them while the exact experts
    are in flight, nothing is dequantized, and the output is resident's."""
    path = checkpoints[("mixtral", "per_expert")]
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    refs = [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=2)).generate(prompts, params)]
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, cache_budget=0.25)
    source = DelayedSource(path, 0.02)
    engine = Engine(EngineConfig(model=path, max_batch_size=2, decoder=decoder), fetch=source)
    source.runtime = engine.runtime
    decoded = []
    admit = engine.runtime.admit_staged

    def admit_and_look():
        decoded.append(len(engine.runtime.decoded))
        admit()

    engine.runtime.admit_staged = admit_and_look
    assert [o.token_ids for o in engine.generate(prompts, params)] == refs
    rt = engine.runtime
    assert all(isinstance(m, PackedInt4) for pair in rt.shadow.values() for m in pair)
    assert rt.counters.shadow_uses > 0 and decoded and not any(decoded)


def test_unpacked_shadows_are_dequantized_into_a_pool_kept_across_rounds(checkpoints):
    """int8 shadows (no packed form): a copy dequantized in one round serves later rounds from
    the pool, which never holds more than ``pool_bytes`` (the shadow's size) between rounds."""
    path = checkpoints[("mixtral", "per_expert")]
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    refs = [o.token_ids for o in Engine(EngineConfig(model=path, max_batch_size=2)).generate(prompts, params)]
    decoder = DecoderConfig(mode="specmoe", draft_policy="shadow", k=3, cache_budget=0.25, shadow_bits=8)
    source = DelayedSource(path, 0.02)
    engine = Engine(EngineConfig(model=path, max_batch_size=2, decoder=decoder), fetch=source)
    source.runtime = rt = engine.runtime
    assert rt.pool_bytes == rt.shadow_bytes > 0
    carried, reused, held = set(), [], []
    admit, dequantized = rt.admit_staged, rt._dequantized

    def admit_and_look():
        admit()
        held.append(sum(g.nbytes + d.nbytes for g, d in rt.decoded.values()))
        carried.clear()
        carried.update(rt.decoded)

    def look_and_dequantize(key):
        reused.append(key in carried)
        return dequantized(key)

    rt.admit_staged, rt._dequantized = admit_and_look, look_and_dequantize
    assert [o.token_ids for o in engine.generate(prompts, params)] == refs
    assert any(reused) and max(held) <= rt.pool_bytes
