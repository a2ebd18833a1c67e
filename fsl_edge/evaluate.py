"""Held-out loss of a base model and of a federation's result (its two adapters on the split)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from .baselines import evaluator
from .config import LearningSettings, SplitMode
from .data import Batch
from .simulation import SiteData, eval_batches, heldout_losses
from .split import discover, finish, run_blocks
from .step import ServerPart, SitePart, party_options, split_eval


def load_result(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The site and server adapters saved in a run or checkpoint folder."""
    return (load_file(folder / "site_adapter.safetensors"),
            load_file(folder / "server_adapter.safetensors"))


def split_parts(model: torch.nn.Module, settings: LearningSettings, site_adapter: dict,
                server_adapter: dict) -> tuple[SitePart, ServerPart]:
    """A site and a server holding a federation's adapters on copies of `model`, in eval mode."""
    cut = settings.split.cut(discover(model).n_blocks)
    site = SitePart(copy.deepcopy(model), cut, settings.lora, settings.train.lr, **party_options(settings))
    server = ServerPart(copy.deepcopy(model), cut, settings.lora, settings.train.lr,
                        **party_options(settings))
    site.load_adapter(site_adapter)
    server.load_adapter(server_adapter)
    site.model.eval()
    server.model.eval()
    return site, server


def split_evaluator(model: torch.nn.Module, settings: LearningSettings, site_adapter: dict,
                    server_adapter: dict):
    """(sum of token losses, tokens) of a batch through the split with a federation's adapters."""
    site, server = split_parts(model, settings, site_adapter, server_adapter)
    return lambda batch: split_eval(site, server, batch)


@torch.no_grad()
def split_logits(site: SitePart, server: ServerPart, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the federation's own forward: the site's front, the trunk, then the
    site's back blocks and head (u-shape) or the server's head (vanilla)."""
    batch = Batch(input_ids, attention_mask, labels=input_ids)  # labels: only vanilla sends them
    up = site.front(batch)
    h = server.trunk(up)  # (B, T, C) at cut b
    if site.cut.mode is SplitMode.VANILLA:
        return finish(server.parts, h)
    h = run_blocks(site.parts, h, site.cut.b, site.cut.n, up.attention_mask, up.position_ids)
    return finish(site.parts, h)  # (B, T, V)


def heldout_before_after(model: torch.nn.Module, sites: list[SiteData], settings: LearningSettings,
                         pad_id: int, site_adapter: dict, server_adapter: dict):
    """((per site, overall) of the base model, (per site, overall) with the adapters)."""
    batches = {s.name: eval_batches(s.heldout, settings.train.batch_size, pad_id) for s in sites}
    before = heldout_losses(evaluator(model), batches)
    after = heldout_losses(split_evaluator(model, settings, site_adapter, server_adapter), batches)
    return before, after
