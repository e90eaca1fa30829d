"""Routing history: which experts requests have used, for cache priority and prefetch.

The training-free form of MoE-Infinity's activation-aware strategy. Over the exact passes
seen so far it keeps, per MoE layer, two decayed statistics of the routing:

* ``frequency[l]`` [E]: how often each expert of layer l was chosen (a token-expert pair
  counts 1); every observation of the layer first multiplies the old counts by ``decay``,
  so recent requests weigh more (an expert activation matrix summarised as frequencies);
* ``transition[l]`` [E, E']: for tokens routed to expert i at layer l, how often they went
  to expert j at the next MoE layer (same decay).

``priority((l, e))`` is ``frequency[l][e]`` normalised by the layer's total: a cache can
evict the lowest first. ``predict(l, experts, depth, width)`` is the prefetch: for the next
``depth`` MoE layers, score each expert by the transition rows of the experts in use now
(the history conditional on the current routing) plus ``prior`` times the layer's
normalised frequency, and return the ``width`` best per layer; layer l+2 is predicted from
layer l+1's prediction, and so on. Nothing here changes which expert a token uses, so the
output stays exact; a wrong prediction only costs bytes.

Letters: E experts of a layer, E' experts of the next MoE layer, N tokens, K top-k.
"""

from __future__ import annotations

import torch

Key = tuple[int, int]


class RoutingHistory:
    def __init__(self, num_experts: dict[int, int], decay: float = 0.99, prior: float = 0.5):
        if not 0 < decay <= 1:
            raise ValueError(f"history decay must be in (0, 1], got {decay}")
        if prior < 0:
            raise ValueError(f"history prior must be >= 0, got {prior}")
        self.layers = sorted(num_experts)
        self.next_layer = dict(zip(self.layers, self.layers[1:]))
        self.decay, self.prior = decay, prior
        self.frequency = {l: torch.zeros(n) for l, n in num_experts.items()}  # [E] per layer
        self.transition = {
            l: torch.zeros(num_experts[l], num_experts[nxt]) for l, nxt in self.next_layer.items()
        }  # [E, E'] per layer with a next MoE layer
        self.last: dict[int, torch.Tensor] = {}  # layer -> this pass's top_k_index [N, K], on the host

    def observe(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Record one exact pass's routing of ``layer``: top_k_index [N, K]."""
        index = top_k_index.detach().to("cpu", torch.long)  # sync: the history lives on the host
        self.frequency[layer].mul_(self.decay)
        self.frequency[layer].add_(torch.bincount(index.reshape(-1), minlength=len(self.frequency[layer])).float())
        previous = self.prior_layer(layer)
        if previous is not None and previous in self.last and self.last[previous].shape[0] == index.shape[0]:
            before = self.last[previous]  # [N, K] at the previous MoE layer, same tokens
            pairs_from = before[:, :, None].expand(-1, -1, index.shape[1]).reshape(-1)  # [N*K*K]
            pairs_to = index[:, None, :].expand(-1, before.shape[1], -1).reshape(-1)  # [N*K*K]
            matrix = self.transition[previous]
            matrix.mul_(self.decay)
            matrix.index_put_((pairs_from, pairs_to), torch.ones(pairs_from.shape[0]), accumulate=True)
        self.last[layer] = index

    def prior_layer(self, layer: int) -> int | None:
        return next((l for l, nxt in self.next_layer.items() if nxt == layer), None)

    def priority(self, key: Key) -> float:
        """The expert's share of its layer's recent activations (0 for one never seen)."""
        freq = self.frequency.get(key[0])
        if freq is None:
            return 0.0
        total = float(freq.sum())
        return float(freq[key[1]]) / total if total else 0.0

    def predict(self, layer: int, experts: list[int], depth: int, width: int) -> dict[int, list[int]]:
        """The ``width`` likeliest experts of each of the ``depth`` MoE layers after ``layer``,
        given that ``experts`` are in use at ``layer`` now (best first)."""
        out: dict[int, list[int]] = {}
        current, at = list(experts), layer
        for _ in range(depth):
            nxt = self.next_layer.get(at)
            if nxt is None or not current:
                break
            rows = self.transition[at][current].sum(dim=0)  # [E']
            freq = self.frequency[nxt]
            score = rows / rows.sum().clamp_min(1e-30) + self.prior * freq / freq.sum().clamp_min(1e-30)  # [E']
            if not bool(score.any()):
                break  # nothing seen yet: no prediction rather than a guess
            ranked = torch.argsort(score, descending=True, stable=True)
            current = [int(e) for e in ranked[: min(width, int((score > 0).sum()))]]
            out[nxt] = current
            at = nxt
        return out
