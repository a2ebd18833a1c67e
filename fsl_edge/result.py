"""A federation's result on disk, and the fine-tuned model it makes with its base model.

Three kinds of folder hold a result: a coordinator's checkpoint folder (`LATEST` names its newest
complete round), one of its round folders (`round-NNNNNN/` with `state.json`), and a
`fsl-edge simulate` run folder (`metrics.json`). Each has the site adapter and the trunk adapter
as two safetensors files, and records the base model and the learning settings.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import LearningSettings
from .errors import ConfigError, ModelError
from .lora import attach, load_adapter_state
from .split import discover

SITE, SERVER = "site_adapter.safetensors", "server_adapter.safetensors"
READ_ATTEMPTS = 5  # a running coordinator may replace LATEST's round while we read it


@dataclass
class FederationResult:
    folder: Path  # the folder the adapters were read from
    model: str  # the base model as the run named it (a spec for `models.load`)
    settings: LearningSettings
    site_adapter: dict[str, torch.Tensor]
    server_adapter: dict[str, torch.Tensor]
    round: int | None = None  # rounds completed, when a coordinator wrote it
    data: Path | None = None  # the data folder, when a `fsl-edge simulate` run recorded it

    def describe(self) -> str:
        return str(self.folder) + ("" if self.round is None else f" (round {self.round})")


def read_result(path: str | os.PathLike) -> FederationResult:
    """Read the result in a checkpoint, round or run folder; see the module doc for the kinds.

    A checkpoint folder may belong to a coordinator that is still running: the round folder
    LATEST names is read whole (adapters and state from one and the same folder), and read again
    from the new LATEST if the coordinator replaced or pruned it meanwhile.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}: expected a coordinator's checkpoint folder, "
                          "one of its round-NNNNNN folders, or a `fsl-edge simulate` run folder")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; a checkpoint is a folder")
    if not (path / "LATEST").is_file():
        return _read_folder(path)
    for attempt in range(READ_ATTEMPTS):
        latest = (path / "LATEST").read_text().strip()
        folder = path / latest
        try:
            before = folder.stat().st_ino
            result = _read_folder(folder)
            if folder.stat().st_ino == before:  # the same folder from start to end
                return result
        except (FileNotFoundError, ConfigError):
            if attempt == READ_ATTEMPTS - 1:
                raise
        time.sleep(0.2 * (attempt + 1))
    raise ConfigError(f"{path} changed under every one of {READ_ATTEMPTS} reads; try again")


def _read_folder(folder: Path) -> FederationResult:
    if (folder / "state.json").is_file():
        state = _json(folder / "state.json")
        fingerprint = state.get("fingerprint") or {}
        model, training, round_ = fingerprint.get("model"), fingerprint.get("training"), state.get("round")
        data = None
    elif (folder / "metrics.json").is_file():
        metrics = _json(folder / "metrics.json")
        model, training, round_ = _spec_of(metrics.get("model")), metrics.get("settings"), None
        data = Path(metrics["data"]) if isinstance(metrics.get("data"), str) else None
    else:
        raise ConfigError(f"{folder} is not a checkpoint: expected LATEST (a coordinator's checkpoint "
                          "folder), state.json (one of its round folders) or metrics.json (a "
                          "`fsl-edge simulate` run folder)")
    if not isinstance(model, str) or not isinstance(training, dict):
        raise ConfigError(f"{folder} does not record its base model and settings")
    try:
        settings = LearningSettings.model_validate(training)
    except ValidationError as e:
        raise ConfigError(f"the settings recorded in {folder} are not readable by this version of "
                          f"fsl-edge: {e.errors()[0]['msg']}") from e
    return FederationResult(folder, model, settings, _tensors(folder / SITE),
                            _tensors(folder / SERVER), round_, data)


def _json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return doc


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the folder holds no complete result")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path} is not a readable safetensors file: {e}") from e


def _spec_of(description: object) -> object:
    # a run folder records `ModelSource.describe()`: "smollm2 (folder: /path)" or just the spec
    if isinstance(description, str):
        m = re.fullmatch(r"(.*) \((?:folder|gguf): .*\)", description)
        return m.group(1) if m else description
    return description


def load_base(spec: str, device: str = "cpu"):
    """Load the base model a result was trained on (`models.LoadedModel`), or say what is missing."""
    from .models import load

    try:
        return load(spec, device=device)
    except ModelError as e:
        raise ModelError(f"the checkpoint's base model {spec!r} is not available here: {e}. "
                         "Pull or copy it, or name it with --model") from e


def lora_blocks(model: torch.nn.Module, settings: LearningSettings) -> tuple[list[int], list[int]]:
    """The blocks that carry LoRA: (the site's, the server's), as the run's parties attach them."""
    cut = settings.split.cut(discover(model).n_blocks)
    return [b for b in cut.site_blocks if b >= settings.prefix.frozen], cut.server_blocks


def tuned_model(base: torch.nn.Module, result: FederationResult) -> torch.nn.Module:
    """The fine-tuned model as one peft model on a copy of `base`: LoRA on the site's blocks and
    the trunk's, loaded with both adapters (their keys name their blocks, so they do not clash)."""
    overlap = set(result.site_adapter) & set(result.server_adapter)
    if overlap:
        raise ConfigError(f"the site and trunk adapters of {result.folder} share weights "
                          f"(e.g. {sorted(overlap)[0]}): they are not from one split run")
    site, server = lora_blocks(base, result.settings)
    lm = attach(copy.deepcopy(base), sorted(site + server), result.settings.lora)
    try:
        load_adapter_state(lm, {**result.site_adapter, **result.server_adapter})
    except ConfigError as e:
        raise ConfigError(f"the adapters of {result.folder} do not fit this base model ({e}); "
                          f"they were trained on {result.model!r}") from e
    return lm.eval()
