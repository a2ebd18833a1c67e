"""LoRA adapters with peft on the blocks a party runs, and their state as plain tensors.

Both sides wrap their copy of the base model with peft, restricted by `layers_to_transform` to
the blocks they run. Adapter names keep the block index (`...layers.3.self_attn.q_proj.lora_A...`),
so the site adapters of different sites line up for FedAvg and the union of a site's and the
server's adapters is exactly the adapter of a centralised LoRA run.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import LoraSettings
from .errors import ConfigError
from .split import discover

# Attention projections per family: the usual LoRA placement (QLoRA, SplitLoRA).
DEFAULT_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The family default, or else every linear layer inside block 0's attention module."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    block = discover(model).blocks[0]
    names = sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules()
                    if "attn" in name.lower() and type(m).__name__ in ("Linear", "Conv1D")})
    if not names:
        raise ConfigError(f"no default LoRA targets for model type {model_type!r}: "
                          "set lora.target_modules")
    return tuple(names)


def check_quantize(settings: LoraSettings) -> None:
    """QLoRA needs CUDA and bitsandbytes; say so before anything is loaded."""
    if settings.quantize is None:
        return
    if not torch.cuda.is_available():
        raise ConfigError("QLoRA (quantize='4bit') needs a CUDA GPU and none is visible here; "
                          "unset lora.quantize to train in full precision on the CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("QLoRA (quantize='4bit') needs the bitsandbytes package: "
                          "pip install bitsandbytes") from e


def attach(model: nn.Module, layers: list[int], settings: LoraSettings) -> nn.Module:
    """Wrap `model` with peft LoRA on the given block indices; only LoRA weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    if not layers:
        raise ConfigError("LoRA needs at least one block to attach to")
    parts = discover(model)
    targets = list(settings.target_modules or default_targets(model))
    block_types = {type(m).__name__ for m in parts.blocks[0].modules()}
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, layers_to_transform=sorted(layers),
        layers_pattern=parts.blocks_name, bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out="Conv1D" in block_types,  # GPT-2 stores its projections transposed
    )
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # QLoRA: norms in fp32, inputs that require grad, the usual peft preparation
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        with warnings.catch_warnings():
            # peft calls a transformers API that transformers 5 deprecates; nothing for us to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"LoRA targets {targets} do not fit this model: {e}") from e


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights only, detached copies keyed by peft's names (what leaves a process)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the LoRA weights with `state`; every key must exist with the same shape."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(model)
    missing = set(current) - set(state)
    unknown = set(state) - set(current)
    if missing or unknown:
        raise ConfigError(f"adapter does not match: missing {sorted(missing)[:3]}, "
                          f"unknown {sorted(unknown)[:3]}")
    for k, v in state.items():
        if v.shape != current[k].shape:
            raise ConfigError(f"adapter tensor {k} has shape {tuple(v.shape)}, "
                              f"expected {tuple(current[k].shape)}")
    set_peft_model_state_dict(model, state)


def lora_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trainable (LoRA) weights, keyed like `adapter_state`."""
    return {_peft_key(name): p.grad.detach().clone()
            for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _peft_key(param_name: str) -> str:
    # named_parameters says '...lora_A.default.weight'; peft's state dict drops the adapter name
    return param_name.replace(".default.", ".")
