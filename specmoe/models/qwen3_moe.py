"""Qwen3-MoE (``model_type: qwen3_moe``): Qwen2-MoE without the shared expert, with
per-head RMSNorm on queries and keys and an optional bias on every attention projection.
Letters as in ``specmoe.layers``.
"""

from __future__ import annotations

import torch

from specmoe.layers import RMSNorm
from specmoe.models.mixtral import MixtralAttention, MixtralSparseMoeBlock
from specmoe.models.qwen2_moe import CHECKPOINT_NAMES, Qwen2MoeDecoderLayer, Qwen2MoeForCausalLM


class Qwen3MoeAttention(MixtralAttention):
    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor):
        q, k, v = super().project(x)  # [N, heads, D]
        return self.q_norm(q), self.k_norm(k), v


class Qwen3MoeSparseMoeBlock(MixtralSparseMoeBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(
            config, layer_idx, config.num_experts, config.moe_intermediate_size, config.norm_topk_prob, cast_weights=True
        )


class Qwen3MoeDecoderLayer(Qwen2MoeDecoderLayer):
    attention_class = Qwen3MoeAttention
    sparse_block_class = Qwen3MoeSparseMoeBlock


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    decoder_layer_class = Qwen3MoeDecoderLayer
    checkpoint_names = CHECKPOINT_NAMES
