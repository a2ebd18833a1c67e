"""Training state on disk without pickle: tensors in safetensors, the rest in JSON.

An optimizer's state_dict is split into its tensors (`state.<param>.<name>`) and its JSON-able
remainder (param_groups, scalar entries), so a checkpoint can be read back with no code
execution, unlike torch.save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .atomic import save_tensors, write_atomic


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    for key, value in meta["scalars"].items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_optimizer(folder: Path, prefix: str, optimizer: torch.optim.Optimizer) -> None:
    tensors, meta = optimizer_state(optimizer)
    save_tensors(folder / f"{prefix}_optimizer.safetensors", tensors)
    write_atomic(folder / f"{prefix}_optimizer.json", json.dumps(meta))


def restore_optimizer(folder: Path, prefix: str, optimizer: torch.optim.Optimizer) -> None:
    meta = json.loads((folder / f"{prefix}_optimizer.json").read_text())
    load_optimizer_state(optimizer, load_file(folder / f"{prefix}_optimizer.safetensors"), meta)
