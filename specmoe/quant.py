"""Group-wise symmetric int8 / int4 quantization of weight matrices.

A [R, C] matrix is split into groups of ``group_size`` consecutive values along C; each
group keeps one fp16 scale (max |x| / qmax) and its values rounded to integers in
[-qmax, qmax] (qmax = 127 for int8, 7 for int4). int4 values are packed two per byte.
An int4 copy with groups of 32 costs 0.5625 bytes per weight: 28% of bf16. When C is not a
multiple of the group size the last group is padded with zeros (Cp = C rounded up), so any
width can be quantized with any group size.

``PackedInt4`` is an int4 copy in the layout of torch's CPU int4 matmul
(``aten._weight_int4pack_mm_for_cpu``): ``linear`` multiplies by the 4-bit weights directly,
with bf16 activations, so using a copy costs about what a dense matmul costs and no
dequantised copy is made. Its scales are kept as the kernel reads them, a bf16 (scale, zero = 0)
pair per group: 0.625 bytes per weight with groups of 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

QMAX = {8: 127, 4: 7}


@dataclass
class QuantizedTensor:
    data: torch.Tensor  # int8 [R, Cp] (8-bit) or uint8 [R, Cp/2] (4-bit, two values per byte)
    scales: torch.Tensor  # fp16 [R, Cp / group_size]
    bits: int
    group_size: int
    shape: tuple[int, int]  # (R, C) before padding

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        groups, size = self.scales.shape[1], self.group_size
        scales = self.scales.float()[..., None]  # [R, G, 1]
        if self.bits == 4:  # unpacked straight into fp32 (low nibble: even columns), then offset and scaled in place
            values = torch.empty(rows, groups * size // 2, 2, device=self.data.device)  # [R, Cp/2, 2]
            values[..., 0] = self.data & 0x0F
            values[..., 1] = self.data >> 4
            w = values.view(rows, groups, size).sub_(8).mul_(scales)  # [R, G, g]
        else:
            w = self.data.view(rows, groups, size) * scales  # [R, G, g]
        return w.view(rows, groups * size)[:, :cols].to(dtype)  # [R, C]


def check_group_size(bits: int, group_size: int, name: str = "group_size") -> None:
    if not isinstance(group_size, int) or group_size < 2 or (bits == 4 and group_size % 2):
        raise ValueError(f"{name} must be an integer >= 2 (even for int4: values are packed in pairs), got {group_size!r}")


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 32) -> QuantizedTensor:
    """weight [R, C] -> QuantizedTensor; the last group is zero-padded when ``group_size`` does not divide C."""
    if bits not in QMAX:
        raise ValueError(f"bits must be one of {sorted(QMAX)}, got {bits}")
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {tuple(weight.shape)}")
    check_group_size(bits, group_size)
    rows, cols = weight.shape
    padded = -(-cols // group_size) * group_size
    qmax = QMAX[bits]
    groups = F.pad(weight.float(), (0, padded - cols)).reshape(rows, padded // group_size, group_size)  # [R, G, g]
    scales = (groups.abs().amax(dim=-1) / qmax).clamp_min(1e-8).to(torch.float16)  # [R, G]
    q = torch.round(groups / scales.float()[..., None]).clamp(-qmax, qmax).to(torch.int8).reshape(rows, padded)
    if bits == 4:
        u = (q + 8).to(torch.uint8).reshape(rows, padded // 2, 2)
        data = u[..., 0] | (u[..., 1] << 4)  # [R, Cp/2]
    else:
        data = q
    return QuantizedTensor(data.contiguous(), scales, bits, group_size, (rows, cols))


CPU_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 matmul takes


@dataclass
class PackedInt4:
    """An int4 matrix [R, C] in the CPU int4 matmul's layout (see the module docstring)."""

    data: torch.Tensor  # uint8, R x Cp/2 values in the kernel's own order
    scales_zeros: torch.Tensor  # bf16 [G, R, 2]: (scale, 0) per group
    group_size: int
    shape: tuple[int, int]  # (R, C) before padding

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales_zeros.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T from the packed weights, in bf16. x [n, C] -> [n, R]"""
        padded = self.scales_zeros.shape[0] * self.group_size
        x16 = F.pad(x, (0, padded - self.shape[1])).to(torch.bfloat16)  # [n, Cp]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x16, self.data, self.group_size, self.scales_zeros).to(x.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights ``linear`` multiplies by, exactly: the kernel applied to the fp32 identity. -> [R, C]"""
        padded = self.scales_zeros.shape[0] * self.group_size
        eye = torch.eye(padded, device=self.data.device)  # [Cp, Cp]
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.data, self.group_size, self.scales_zeros.float())  # [Cp, R]
        return w.t()[:, : self.shape[1]].contiguous().to(dtype)


def pack_int4_for_cpu(q: QuantizedTensor) -> PackedInt4 | None:
    """``q`` in the CPU int4 matmul's layout, or None where that kernel does not take it (not
    int4, a group size it lacks, rows not a multiple of 16, not on the CPU, a torch without it)."""
    rows, _ = q.shape
    kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if not kernel or q.bits != 4 or q.group_size not in CPU_INT4_GROUPS or rows % 16 or q.data.device.type != "cpu":
        return None
    padded = q.scales.shape[1] * q.group_size
    values = torch.stack((q.data & 0x0F, q.data >> 4), dim=-1).reshape(rows, padded).to(torch.int32)  # [R, Cp], value + 8
    data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    scales = q.scales.t().to(torch.bfloat16)  # [G, R]
    return PackedInt4(data, torch.stack((scales, torch.zeros_like(scales)), dim=-1).contiguous(), q.group_size, q.shape)


def packed_ffn(x: torch.Tensor, gate_up: PackedInt4, down: PackedInt4, act_fn) -> torch.Tensor:
    """One expert's gated FFN on packed int4 weights (gate rows first, then up rows). x [n, H] -> [n, H]"""
    gate, up = gate_up.linear(x).chunk(2, dim=-1)  # [n, I] each
    return down.linear(act_fn(gate) * up)
