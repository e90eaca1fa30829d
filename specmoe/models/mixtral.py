"""Mixtral (``model_type: mixtral``), the base family: the others subclass these classes.

Runs ragged batches (see ``specmoe.batch``) against a ``KVCache``; letters as in
``specmoe.layers``. Parameter names follow transformers v5 (``mlp.experts.gate_up_proj``);
``CHECKPOINT_NAMES`` maps the Hub's per-expert names onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from specmoe.batch import ForwardBatch
from specmoe.kv_cache import KVCache
from specmoe.layers import (
    Experts,
    RMSNorm,
    RotaryEmbedding,
    TopKRouter,
    apply_rotary,
    input_major_linear,
    ragged_attention,
)
from specmoe.weights import WeightName

CHECKPOINT_NAMES = (
    WeightName("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight", "model.layers.{l}.mlp.experts.gate_up_proj", "gate"),
    WeightName("model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight", "model.layers.{l}.mlp.experts.gate_up_proj", "up"),
    WeightName("model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight", "model.layers.{l}.mlp.experts.down_proj", "expert"),
    WeightName("model.layers.{l}.block_sparse_moe.gate.weight", "model.layers.{l}.mlp.gate.weight", "whole"),
)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class MixtralAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = self.window(config, layer_idx)
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = self.biases(config)
        self.q_proj = input_major_linear(hidden, q_size, bias=qkv_bias)
        self.k_proj = input_major_linear(hidden, kv_size, bias=qkv_bias)
        self.v_proj = input_major_linear(hidden, kv_size, bias=qkv_bias)
        self.o_proj = input_major_linear(q_size, hidden, bias=o_bias)

    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o)."""
        return False, False

    @staticmethod
    def window(config, layer_idx: int) -> int | None:
        return getattr(config, "sliding_window", None) or None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x [N, H] -> q [N, Hq, D], k and v [N, Hkv, D]
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch, cache: KVCache):
        q, k, v = self.project(x)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = ragged_attention(q, k, v, batch, cache, self.layer_idx, self.scaling, self.sliding_window)
        return self.o_proj(out)


class MixtralSparseMoeBlock(nn.Module):
    def __init__(
        self,
        config,
        layer_idx: int,
        num_experts: int | None = None,
        intermediate_size: int | None = None,
        norm_topk_prob: bool = True,
        cast_weights: bool = False,
    ):
        super().__init__()
        num_experts = num_experts or config.num_local_experts
        intermediate_size = intermediate_size or config.intermediate_size
        top_k, hidden = config.num_experts_per_tok, config.hidden_size
        self.gate = TopKRouter(hidden, num_experts, top_k, norm_topk_prob, cast_weights, layer_idx)
        self.experts = Experts(num_experts, hidden, intermediate_size, config.hidden_act, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, weights, indices = self.gate(x)  # [N, K]
        return self.experts(x, indices, weights)


class MixtralDecoderLayer(nn.Module):
    attention_class = MixtralAttention

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_class(config, layer_idx)
        self.mlp = self.make_mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(config, layer_idx)

    def forward(self, x: torch.Tensor, rope, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MixtralModel(nn.Module):
    def __init__(self, config, layer_class: type[nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim(config))

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [N, H]
        rope = self.rotary_emb(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, batch, cache)
        return self.norm(x)


class MixtralForCausalLM(nn.Module):
    """The family's causal LM over ragged batches.

    ``forward(input_ids [N], batch, cache, rows)`` appends the batch's tokens to the cache and
    returns logits [R, V] for the packed rows ``rows`` (default: each sequence's last token).
    """

    decoder_layer_class: type[nn.Module] = MixtralDecoderLayer
    checkpoint_names = CHECKPOINT_NAMES

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = MixtralModel(config, self.decoder_layer_class)
        self.lm_head = input_major_linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after ``to_empty``)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def tied_names(self) -> dict[str, str]:
        """Parameters that share storage: name -> the name that is loaded."""
        if getattr(self.config, "tie_word_embeddings", False):
            return {"lm_head.weight": "model.embed_tokens.weight"}
        return {}

    def moe_blocks(self) -> list[tuple[int, nn.Module]]:
        """(layer index, sparse MoE block) for every layer that routes to experts."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if hasattr(layer.mlp, "experts")]

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, key-value heads, head dim) for sizing a KVCache."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, head_dim(c)

    def forward(
        self, input_ids: torch.Tensor, batch: ForwardBatch, cache: KVCache, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.model(input_ids, batch, cache)  # [N, H]
        cache.commit(batch)
        hidden = hidden[batch.last_rows if rows is None else rows]  # [R, H]
        return self.lm_head(hidden).float()  # [R, V]
