"""Building blocks shared by every model family.

Shapes use these letters:
    N  packed tokens of a ragged batch (all sequences' new tokens, sequence-major)
    B  sequences in the batch          Tq  new tokens of the longest sequence
    Tk keys visible to the longest sequence
    H  hidden size   Hq / Hkv  query / key-value heads   D  head dim
    E  experts       K  experts per token (top-k)      I  expert intermediate size
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from specmoe.batch import ForwardBatch
from specmoe.kv_cache import KVCache
from specmoe.quant import PackedInt4, packed_ffn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE computed from positions on the fly (no table to outgrow).

    ``inv_freq`` is a plain float32 attribute, not a buffer: it survives building the model
    on the meta device and is never cast to the model's dtype.
    """

    def __init__(self, config, head_dim: int):
        super().__init__()
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            dims = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu")
            inv_freq = 1.0 / (base ** (dims / head_dim))
            self.scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, {sorted(ROPE_INIT_FUNCTIONS)}")
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        self.inv_freq = inv_freq.float()  # [D/2]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [N, heads, D]; cos, sin [N, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_dtype(q: torch.Tensor) -> torch.dtype:
    """float32 for bf16 and fp16 on the CPU: there, scaled_dot_product_attention on upcast inputs
    measured 2-4x faster than in the reduced dtype for a decode step at batch 16 (and no slower
    for prefill), and it is the more accurate of the two. Other devices keep the dtype."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return q.dtype


def ragged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: ForwardBatch,
    cache: KVCache,
    layer: int,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write this step's keys and values into the cache, then attend over each sequence's prefix.

    q [N, Hq, D], k and v [N, Hkv, D] (after RoPE) -> [N, Hq*D].
    """
    cache.write(layer, batch, k, v)
    keys, values = cache.read(layer, batch)  # [B, Hkv, Tk, D]
    if batch.is_decode:
        queries = q[:, :, None, :]  # [B, Hq, 1, D]
    else:
        queries = q[batch.pad_index].transpose(1, 2)  # [B, Hq, Tq, D]
    compute = attention_dtype(q)
    out = F.scaled_dot_product_attention(
        queries.to(compute), keys.to(compute), values.to(compute),
        attn_mask=batch.mask(sliding_window), scale=scale, enable_gqa=True,
    )  # [B, Hq, Tq, D]
    out = out.transpose(1, 2).to(q.dtype)  # [B, Tq, Hq, D]
    if not batch.is_decode:
        out = out.reshape(-1, *out.shape[2:])[batch.packed_index]  # [N, Hq, D]
    return out.reshape(out.shape[0], -1)


class MLP(nn.Module):
    """A dense gated MLP (shared experts and dense layers of some families)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.gate_proj = input_major_linear(hidden_size, intermediate_size)
        self.up_proj = input_major_linear(hidden_size, intermediate_size)
        self.down_proj = input_major_linear(intermediate_size, hidden_size)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TopKRouter(nn.Module):
    """Softmax router. Returns the triple ``(logits, weights, indices)`` that drafts record.

    ``norm_topk_prob`` renormalises the top-k weights to sum to one; ``cast_weights`` casts
    them to the hidden dtype (Qwen, OLMoE) instead of keeping float32 (Mixtral).

    ``hooks`` see every routing decision, in the order they were added, and each may replace
    it: ``hook(router, x, logits, weights, indices) -> (logits, weights, indices)``. Profiling,
    drafting and lookahead prefetch attach here (``add_hook`` / ``remove_hook``), side by
    side; the model files never know.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool, cast_weights: bool, layer: int
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.cast_weights = cast_weights
        self.layer = layer
        self.hooks: list[Callable] = []

    def add_hook(self, hook: Callable) -> Callable:
        self.hooks.append(hook)
        return hook

    def remove_hook(self, hook: Callable) -> None:
        self.hooks.remove(hook)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [N, E]
        weights, indices = self.select(logits)  # [N, K]
        for hook in self.hooks:
            logits, weights, indices = hook(self, x, logits, weights, indices)
        return logits, weights, indices

    def select(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k weights and indices from logits [N, E].

        ``allowed`` [E] bool restricts the choice to the top-k among the allowed experts; the
        chosen weights are then rescaled to the mass the unrestricted top-k would have had, so
        nothing changes when nothing is excluded. A pick beyond the allowed ones (fewer allowed
        than k) has weight 0; with none allowed every weight is 0 and the experts contribute
        nothing (the layer's routed output is zero), never 0/0.
        """
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [N, K]
        if allowed is not None:
            mass = weights.sum(dim=-1, keepdim=True)
            weights, indices = torch.topk(probs.masked_fill(~allowed, 0.0), self.top_k, dim=-1)
            weights = weights * (mass / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30))
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        if self.cast_weights:
            weights = weights.to(logits.dtype)
        return weights, indices


def input_major(*shape: int) -> torch.Tensor:
    """An empty weight of shape [..., out, in] stored input-major (its last two dims transposed).

    ``F.linear(x, w)`` with such a w is one plain ``x @ w.t()`` over contiguous memory, with no
    transposed operand for the BLAS to pack or stride through: on the CPU, with the few tokens
    of a decode step, that measured about a quarter faster for the experts than row-major
    storage. Values, shapes and names are unchanged; loading fills it through ``copy_``.
    """
    *lead, rows, cols = shape
    return torch.empty(*lead, cols, rows).transpose(-1, -2)


def input_major_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """``nn.Linear`` whose weight [out, in] is stored input-major (see ``input_major``)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.weight = nn.Parameter(input_major(out_features, in_features))
    return layer


# Experts with this many tokens and row-major weights (fetched experts) run with the weight
# on the left (``torch.mm(W, x.t())``), which measured faster end to end than ``F.linear`` on
# a 2-core CPU at batch 16 (one token and 9 or more: no gain, so they keep ``F.linear``).
# Input-major weights (the module's own, see ``input_major``) always take ``F.linear``.
SMALL_EXPERT_TOKENS = range(2, 9)


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> torch.Tensor:
    """One expert's gated FFN. x [n, H], gate_up [2I, H], down [H, I] -> [n, H]"""
    if x.shape[0] in SMALL_EXPERT_TOKENS and gate_up.is_contiguous():
        gate, up = torch.mm(gate_up, x.t()).t().chunk(2, dim=-1)  # [n, I] each
        return torch.mm(down, (act_fn(gate) * up).t()).t()
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act_fn(gate) * up, down)


ExpertsForward = Callable[["Experts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
EXPERTS_FUNCTIONS: dict[str, ExpertsForward] = {}


def register_experts_function(name: str) -> Callable[[ExpertsForward], ExpertsForward]:
    def wrap(fn: ExpertsForward) -> ExpertsForward:
        EXPERTS_FUNCTIONS[name] = fn
        return fn

    return wrap


def experts_function(name: str) -> ExpertsForward:
    if name not in EXPERTS_FUNCTIONS:
        raise ValueError(f"unknown experts implementation {name!r}; registered: {sorted(EXPERTS_FUNCTIONS)}")
    return EXPERTS_FUNCTIONS[name]


class Experts(nn.Module):
    """Routed experts as stacked tensors (transformers v5 layout).

    gate_up_proj [E, 2I, H] (gate rows first, then up rows); down_proj [E, H, I].
    The forward is a named function from ``EXPERTS_FUNCTIONS``; the model never knows where
    an expert's weights come from.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str, layer: int):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.layer = layer
        self.gate_up_proj = nn.Parameter(input_major(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(input_major(num_experts, hidden_size, intermediate_size))
        self.act_fn = activation(act)
        self.implementation = "eager"

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[expert], self.down_proj[expert]

    def apply_expert(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, gate_up, down, self.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return experts_function(self.implementation)(self, hidden_states, top_k_index, top_k_weights)


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert: returns (tokens per expert, token rows, flat pair ids)."""
    flat = top_k_index.reshape(-1)  # [N*K]
    order = torch.argsort(flat, stable=True)  # [N*K]
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # sync: the loop below is per expert
    return counts, order // top_k_index.shape[1], order


def run_experts(
    experts: Experts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights_of: Callable[[dict[int, int]], dict | Iterable[tuple[int, object]]],
) -> torch.Tensor:
    """Each expert that has tokens runs once on all of them; tokens sum their experts in expert order.

    ``weights_of({expert: tokens})`` gives each expert's weights w, as a dict or as (expert, w)
    pairs in any order. Experts run in the order given, so an offloading runtime gives first
    the experts that are here, then each one in flight as it arrives; the result is the same
    bit for bit in any order (each expert writes its own rows; the sum below is in expert order).
    w is ``(gate_up, down)`` tensors, a ``PackedInt4`` pair (a shadow copy, multiplied in its
    packed form), None (skip: a draft's placeholder pick, whose routing weight is 0), or a
    function ``x -> future of the expert's output`` (the expert runs elsewhere; such futures
    are awaited once every other expert has run).
    hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K] -> [N, H]
    """
    counts, rows, pairs = group_by_expert(top_k_index, experts.num_experts)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)  # expert e's rows: starts[e] .. starts[e + 1]
    given = weights_of({e: c for e, c in enumerate(counts) if c})
    x = hidden_states[rows]  # [N*K, H], expert-sorted
    complete = isinstance(given, dict) and None not in given.values()  # every row will be written
    y = torch.empty_like(x) if complete else torch.zeros_like(x)  # a skipped expert's rows stay zero
    remote = []
    for expert, w in given.items() if isinstance(given, dict) else given:
        lo, hi = starts[expert], starts[expert + 1]
        if w is None or lo == hi:
            continue
        if callable(w):
            remote.append((lo, hi, w(x[lo:hi])))
        elif isinstance(w[0], PackedInt4):
            y[lo:hi] = packed_ffn(x[lo:hi], *w, experts.act_fn)
        else:
            y[lo:hi] = experts.apply_expert(x[lo:hi], *w)
    for lo, hi, future in remote:
        y[lo:hi] = future.result()
    y = (y * top_k_weights.reshape(-1)[pairs, None]).to(hidden_states.dtype)
    # rows are expert-sorted, so each token sums its experts in expert order (as transformers does)
    return torch.zeros_like(hidden_states).index_add_(0, rows, y)


@register_experts_function("eager")
def eager_experts(experts: Experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Reference: every expert's weights are the module's own stacked tensors.

    In bf16 on the CPU one grouped matmul over all experts (``F.grouped_mm``) is far faster
    than a matmul per expert; fp32 keeps the per-expert loop, which is faster there.
    """
    if hidden_states.dtype == torch.bfloat16 and hasattr(F, "grouped_mm"):
        return grouped_experts(experts, hidden_states, top_k_index, top_k_weights)
    return run_experts(
        experts, hidden_states, top_k_index, top_k_weights, lambda needed: {e: experts.expert_weights(e) for e in needed}
    )


def grouped_experts(experts: Experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """All experts in two grouped matmuls over the expert-sorted tokens (no host sync).

    hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K] -> [N, H]
    """
    flat = top_k_index.reshape(-1)  # [N*K]
    pairs = torch.argsort(flat, stable=True)
    rows = pairs // top_k_index.shape[1]
    offs = torch.bincount(flat, minlength=experts.num_experts).cumsum(0).to(torch.int32)  # [E]
    h = F.grouped_mm(hidden_states[rows], experts.gate_up_proj.transpose(1, 2), offs=offs)  # [N*K, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = F.grouped_mm(experts.act_fn(gate) * up, experts.down_proj.transpose(1, 2), offs=offs)  # [N*K, H]
    y = (y * top_k_weights.reshape(-1)[pairs, None]).to(hidden_states.dtype)
    return torch.zeros_like(hidden_states).index_add_(0, rows, y)
