"""Build a model of the right family from a local Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from specmoe.models import model_class
from specmoe.weights import Checkpoint, CheckpointError, load_weights, read_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; allowed: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_config(model_dir: str | Path):
    """The checkpoint's transformers config, after checking that we support its family."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{str(path)!r} has no config.json")
    model_type = read_json(config_file).get("model_type")
    model_class(model_type)  # raises, listing the supported families
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_model(
    model_dir: str | Path, dtype: str | torch.dtype = "fp32", device: str | torch.device = "cpu", experts: bool = True
) -> nn.Module:
    """Load a checkpoint into our runtime: built on the meta device, then filled by name.

    With ``experts=False`` only the dense part is loaded: routed experts' stacked tensors stay
    empty (zero bytes) and their checkpoint tensors are never read; an ``ExpertRuntime``
    supplies them.
    """
    config = read_config(model_dir)
    checkpoint = Checkpoint(model_dir)
    cls = model_class(config.model_type)
    with torch.device("meta"):
        model = cls(config)
    skip = frozenset() if experts else drop_expert_weights(model)
    model = model.to(dtype=parse_dtype(dtype)).to_empty(device=device)
    model.tie_weights()
    load_weights(model, checkpoint, cls.checkpoint_names, parse_dtype(dtype), skip)
    return model.eval().requires_grad_(False)


def drop_expert_weights(model: nn.Module) -> frozenset[str]:
    """Replace every routed expert tensor by an empty one; returns the parameter names dropped."""
    dropped = set()
    for layer, block in model.moe_blocks():
        for name in ("gate_up_proj", "down_proj"):
            setattr(block.experts, name, nn.Parameter(torch.empty(0)))
            dropped.add(f"model.layers.{layer}.mlp.experts.{name}")
    return frozenset(dropped)
