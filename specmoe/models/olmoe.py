"""OLMoE (``model_type: olmoe``): Mixtral with RMSNorm over the whole query and key
projections (before splitting into heads), optional clipping of q/k/v, optional attention
biases, no sliding window, and top-k weights that are not renormalised by default.
Letters as in ``specmoe.layers``.
"""

from __future__ import annotations

import torch
from torch import nn

from specmoe.layers import RMSNorm
from specmoe.models.mixtral import MixtralAttention, MixtralDecoderLayer, MixtralForCausalLM, MixtralSparseMoeBlock
from specmoe.models.qwen2_moe import CHECKPOINT_NAMES


class OlmoeAttention(MixtralAttention):
    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.clip_qkv = getattr(config, "clip_qkv", None)
        self.q_norm = RMSNorm(self.num_heads * self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, config.rms_norm_eps)

    @staticmethod
    def window(config, layer_idx: int) -> int | None:
        return None

    def project(self, x: torch.Tensor):
        n = x.shape[0]
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)  # [N, heads*D]
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        return (
            q.view(n, self.num_heads, self.head_dim),
            k.view(n, self.num_kv_heads, self.head_dim),
            v.view(n, self.num_kv_heads, self.head_dim),
        )


class OlmoeSparseMoeBlock(MixtralSparseMoeBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(
            config, layer_idx, config.num_experts, config.intermediate_size, config.norm_topk_prob, cast_weights=True
        )


class OlmoeDecoderLayer(MixtralDecoderLayer):
    attention_class = OlmoeAttention

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        return OlmoeSparseMoeBlock(config, layer_idx)


class OlmoeForCausalLM(MixtralForCausalLM):
    decoder_layer_class = OlmoeDecoderLayer
    checkpoint_names = CHECKPOINT_NAMES
