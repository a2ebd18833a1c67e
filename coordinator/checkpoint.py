"""The coordinator's checkpoint: everything needed to resume after the last completed round.

Layout: `<dir>/round-000003/` holds the global site adapter, the trunk adapter, the trunk's
optimizer, RNG state and `state.json` (round, history, registry); `<dir>/LATEST` names the newest
complete one. A round folder is written under a temporary name and renamed, then LATEST is
replaced atomically, so a crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fsl_edge.atomic import save_tensors, write_atomic
from fsl_edge.errors import ConfigError
from fsl_edge.state_io import restore_optimizer, save_optimizer
from fsl_edge.step import ServerPart

KEEP = 2  # round folders kept; older ones are removed after a new one is complete


@dataclass
class Checkpoint:
    round: int  # rounds completed
    site_adapter: dict[str, torch.Tensor]
    state: dict  # history, registry, fingerprint


def save(folder: Path, round_: int, site_adapter: dict[str, torch.Tensor], server: ServerPart,
         state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".round-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".round-", dir=folder))
    try:
        save_tensors(tmp / "site_adapter.safetensors", site_adapter)
        save_tensors(tmp / "server_adapter.safetensors", server.adapter())
        save_optimizer(tmp, "server", server.optimizer)
        save_tensors(tmp / "rng.safetensors", {"torch": torch.get_rng_state()})
        write_atomic(tmp / "state.json", json.dumps({**state, "round": round_}, indent=1))
        final = folder / f"round-{round_:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(folder / "LATEST", final.name)
    for old in sorted(folder.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(folder: Path, server: ServerPart, fingerprint: dict) -> Checkpoint | None:
    """Restore the trunk (adapter, optimizer, RNG) in place; None when there is no checkpoint."""
    latest = folder / "LATEST"
    if not latest.is_file():
        return None
    path = folder / latest.read_text().strip()
    state = json.loads((path / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(f"the checkpoint in {path} is of another run configuration "
                          f"({state.get('fingerprint')}); use a new checkpoint folder")
    server.load_adapter(load_file(path / "server_adapter.safetensors"))
    restore_optimizer(path, "server", server.optimizer)
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    return Checkpoint(state["round"], load_file(path / "site_adapter.safetensors"), state)
