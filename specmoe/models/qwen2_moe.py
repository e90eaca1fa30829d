"""Qwen2-MoE (``model_type: qwen2_moe``): Mixtral plus a shared expert behind a sigmoid gate,
q/k/v biases, optional top-k renormalisation, and dense MLP layers chosen by
``decoder_sparse_step`` / ``mlp_only_layers``. Letters as in ``specmoe.layers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specmoe.layers import MLP
from specmoe.models.mixtral import MixtralAttention, MixtralDecoderLayer, MixtralForCausalLM, MixtralSparseMoeBlock
from specmoe.weights import WeightName

CHECKPOINT_NAMES = (
    WeightName("model.layers.{l}.mlp.experts.{e}.gate_proj.weight", "model.layers.{l}.mlp.experts.gate_up_proj", "gate"),
    WeightName("model.layers.{l}.mlp.experts.{e}.up_proj.weight", "model.layers.{l}.mlp.experts.gate_up_proj", "up"),
    WeightName("model.layers.{l}.mlp.experts.{e}.down_proj.weight", "model.layers.{l}.mlp.experts.down_proj", "expert"),
)


def is_sparse_layer(config, layer_idx: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only_dense = getattr(config, "mlp_only_layers", None) or []
    return layer_idx not in only_dense and config.num_experts > 0 and (layer_idx + 1) % step == 0


class Qwen2MoeAttention(MixtralAttention):
    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        return bool(getattr(config, "qkv_bias", True)), False

    @staticmethod
    def window(config, layer_idx: int) -> int | None:
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[layer_idx] == "sliding_attention":
            return config.sliding_window or None
        return None


class Qwen2MoeSparseMoeBlock(MixtralSparseMoeBlock):
    def __init__(self, config, layer_idx: int):
        super().__init__(
            config, layer_idx, config.num_experts, config.moe_intermediate_size, config.norm_topk_prob, cast_weights=True
        )
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x)  # [N, H]
        _, weights, indices = self.gate(x)  # [N, K]
        routed = self.experts(x, indices, weights)
        return routed + F.sigmoid(self.shared_expert_gate(x)) * shared


class Qwen2MoeDecoderLayer(MixtralDecoderLayer):
    attention_class = Qwen2MoeAttention
    sparse_block_class: type[nn.Module] = Qwen2MoeSparseMoeBlock

    def make_mlp(self, config, layer_idx: int) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return self.sparse_block_class(config, layer_idx)
        return MLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    decoder_layer_class = Qwen2MoeDecoderLayer
    checkpoint_names = CHECKPOINT_NAMES
