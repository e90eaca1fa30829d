"""Model families, chosen by ``config.json``'s ``model_type``."""

from __future__ import annotations

from torch import nn

from specmoe.models.mixtral import MixtralForCausalLM
from specmoe.models.olmoe import OlmoeForCausalLM
from specmoe.models.qwen2_moe import Qwen2MoeForCausalLM
from specmoe.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_FAMILIES: dict[str, type[nn.Module]] = {
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
}


class UnsupportedModelError(ValueError):
    pass


def model_class(model_type: str) -> type[nn.Module]:
    if model_type not in MODEL_FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_FAMILIES))}"
        )
    return MODEL_FAMILIES[model_type]
