"""Key/value cache with per-sequence rollback.

Design: one pool of per-sequence buffers, ``k[layer] -> [S, Hkv, T, D]`` (S slots, T the
maximum sequence length). A sequence owns a slot for its lifetime; its valid length is a
host-side integer. Why not paged blocks:

* rollback of rejected draft tokens is setting an integer (``truncate``), with no block
  bookkeeping or copy, and the next write simply overwrites the stale entries;
* decode attention reads one contiguous prefix per sequence; when a batch's slots are
  consecutive (the scheduler hands them out that way) the read is a view, with no gather;
* on CPU there is no paged-attention kernel, so pages would cost a gather every layer.

The price is reserving T positions per slot; ``max_model_len`` bounds it, and the pool's
size is known (and reported) up front.
"""

from __future__ import annotations

import torch

from specmoe.batch import ForwardBatch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Hkv, T, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV slot; wait for a sequence to finish")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort(reverse=True)  # hand out low slots first: batches stay consecutive

    def snapshot(self) -> tuple[list[int], list[int]]:
        """(lengths, free slots): what ``restore`` needs to undo a round."""
        return list(self.lengths), list(self._free)

    def restore(self, state: tuple[list[int], list[int]]) -> None:
        self.lengths[:], self._free[:] = state

    def truncate(self, slot: int, length: int) -> None:
        """Roll a sequence back to its first ``length`` positions."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def batch(self, slots: list[int], lens: list[int]) -> ForwardBatch:
        """Describe a forward that appends ``lens[i]`` tokens to each slot's sequence."""
        starts = [self.lengths[s] for s in slots]
        for slot, start, n in zip(slots, starts, lens):
            if start + n > self.max_len:
                raise ValueError(
                    f"sequence in slot {slot} would reach {start + n} tokens; max_model_len is {self.max_len}"
                )
        return ForwardBatch(slots, starts, lens, self.k.device)

    def commit(self, batch: ForwardBatch) -> None:
        """Mark the batch's tokens as cached (call after the forward pass)."""
        for slot, start, n in zip(batch.slots, batch.starts, batch.lens):
            self.lengths[slot] = start + n

    def write(self, layer: int, batch: ForwardBatch, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [N, Hkv, D] at (slot_of_token, positions)
        self.k[layer][batch.slot_of_token, :, batch.positions] = k
        self.v[layer][batch.slot_of_token, :, batch.positions] = v

    def read(self, layer: int, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        # -> [B, Hkv, Tk, D]
        tk = batch.kv_len
        if batch.slot_range is not None:
            lo, hi = batch.slot_range
            return self.k[layer, lo:hi, :, :tk], self.v[layer, lo:hi, :, :tk]
        k = self.k[layer, :, :, :tk].index_select(0, batch.slot_tensor)
        v = self.v[layer, :, :, :tk].index_select(0, batch.slot_tensor)
        return k, v
