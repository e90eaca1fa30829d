"""The description of one ragged forward pass.

Letters as in ``specmoe.layers``: N packed new tokens, B sequences, Tq new tokens of the
longest sequence, Tk keys visible to the longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    """B sequences, sequence i adding ``lens[i]`` tokens at positions ``starts[i]..``.

    Built on the host from plain lists, so making one never syncs with the device.
    """

    slots: list[int]
    starts: list[int]
    lens: list[int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        if not (len(self.slots) == len(self.starts) == len(self.lens)) or not self.slots:
            raise ValueError("a ForwardBatch needs one slot, start and length per sequence, and at least one sequence")
        if min(self.lens) < 1:
            raise ValueError(f"every sequence must add at least one token, got lens={self.lens}")
        dev = self.device
        self.num_tokens = sum(self.lens)
        self.max_new = max(self.lens)  # Tq
        self.kv_len = max(s + n for s, n in zip(self.starts, self.lens))  # Tk
        self.is_decode = self.max_new == 1
        positions = [s + j for s, n in zip(self.starts, self.lens) for j in range(n)]
        self.positions = torch.tensor(positions, dtype=torch.long, device=dev)  # [N]
        slot_of_token = [slot for slot, n in zip(self.slots, self.lens) for _ in range(n)]
        self.slot_of_token = torch.tensor(slot_of_token, dtype=torch.long, device=dev)  # [N]
        offsets = [0]
        for n in self.lens:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets  # sequence i owns packed rows offsets[i]:offsets[i+1]
        self.last_rows = torch.tensor([o - 1 for o in offsets[1:]], dtype=torch.long, device=dev)  # [B]
        s0 = self.slots[0]
        self.slot_range = (s0, s0 + len(self.slots)) if self.slots == list(range(s0, s0 + len(self.slots))) else None
        self.slot_tensor = torch.tensor(self.slots, dtype=torch.long, device=dev)  # [B]
        if not self.is_decode:
            tq = self.max_new
            pad = [[o + min(j, n - 1) for j in range(tq)] for o, n in zip(offsets, self.lens)]
            self.pad_index = torch.tensor(pad, dtype=torch.long, device=dev)  # [B, Tq] -> packed row
            packed = [i * tq + j for i, n in enumerate(self.lens) for j in range(n)]
            self.packed_index = torch.tensor(packed, dtype=torch.long, device=dev)  # [N] -> flat [B*Tq]
        self._masks: dict[int | None, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean attention mask [B, 1, Tq, Tk]: causal over each sequence's own prefix.

        Padding queries (beyond a sequence's new tokens) repeat its last real query, so no row is
        empty; their outputs are dropped.
        """
        if sliding_window not in self._masks:
            dev = self.device
            starts = torch.tensor(self.starts, device=dev)[:, None]  # [B, 1]
            lens = torch.tensor(self.lens, device=dev)[:, None]
            j = torch.arange(self.max_new, device=dev)[None, :]  # [1, Tq]
            q_pos = starts + torch.minimum(j, lens - 1)  # [B, Tq]
            k_pos = torch.arange(self.kv_len, device=dev)  # [Tk]
            mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Tq, Tk]
            if sliding_window:
                mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
            self._masks[sliding_window] = mask[:, None]
        return self._masks[sliding_window]
