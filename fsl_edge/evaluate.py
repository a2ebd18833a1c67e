"""Held-out loss of a base model and of a federation's result (its two adapters on the split)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from .baselines import evaluator
from .config import LearningSettings
from .simulation import SiteData, eval_batches, heldout_losses
from .split import discover
from .step import ServerPart, SitePart, party_options, split_eval


def load_result(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The site and server adapters saved in a run or checkpoint folder."""
    return (load_file(folder / "site_adapter.safetensors"),
            load_file(folder / "server_adapter.safetensors"))


def split_evaluator(model: torch.nn.Module, settings: LearningSettings, site_adapter: dict,
                    server_adapter: dict):
    """(sum of token losses, tokens) of a batch through the split with a federation's adapters."""
    cut = settings.split.cut(discover(model).n_blocks)
    site = SitePart(copy.deepcopy(model), cut, settings.lora, settings.train.lr, **party_options(settings))
    server = ServerPart(copy.deepcopy(model), cut, settings.lora, settings.train.lr,
                        **party_options(settings))
    site.load_adapter(site_adapter)
    server.load_adapter(server_adapter)
    site.model.eval()
    server.model.eval()
    return lambda batch: split_eval(site, server, batch)


def heldout_before_after(model: torch.nn.Module, sites: list[SiteData], settings: LearningSettings,
                         pad_id: int, site_adapter: dict, server_adapter: dict):
    """((per site, overall) of the base model, (per site, overall) with the adapters)."""
    batches = {s.name: eval_batches(s.heldout, settings.train.batch_size, pad_id) for s in sites}
    before = heldout_losses(evaluator(model), batches)
    after = heldout_losses(split_evaluator(model, settings, site_adapter, server_adapter), batches)
    return before, after
