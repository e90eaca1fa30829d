"""Group-wise symmetric int8 / int4 quantization of weight matrices.

A [R, C] matrix is split into groups of ``group_size`` consecutive values along C; each
group keeps one fp16 scale (max |x| / qmax) and its values rounded to integers in
[-qmax, qmax] (qmax = 127 for int8, 7 for int4). int4 values are packed two per byte.
An int4 copy with groups of 32 costs 0.5625 bytes per weight: 28% of bf16. When C is not a
multiple of the group size the last group is padded with zeros (Cp = C rounded up), so any
width can be quantized with any group size.
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
        padded = self.scales.shape[1] * self.group_size
        if self.bits == 4:
            low = (self.data & 0x0F).to(torch.int8) - 8
            high = (self.data >> 4).to(torch.int8) - 8
            q = torch.stack((low, high), dim=-1).reshape(rows, padded)  # [R, Cp]
        else:
            q = self.data
        groups = q.reshape(rows, padded // self.group_size, self.group_size).to(torch.float32)  # [R, G, g]
        return (groups * self.scales.float()[..., None]).reshape(rows, padded)[:, :cols].to(dtype)  # [R, C]


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
