"""Reference trainings the federation is measured against: centralised LoRA and a site alone.

Both are plain (unsplit) peft LoRA on every block, with the same LoRA settings, optimizer,
batching and loss as the split run, so a comparison differs only in what the federation does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence

import torch

from .data import Batch, BatchStream, Example
from .lora import attach
from .config import LearningSettings
from .split import causal_lm_loss, discover


def train_lora(model: torch.nn.Module, examples: Sequence[Example], settings: LearningSettings,
               steps: int, pad_id: int, batches: Iterator[Batch] | None = None) -> torch.nn.Module:
    """LoRA-train a copy of `model` for `steps` steps on shuffled batches of `examples` (or on
    the given `batches`); return the peft model."""
    train = settings.train
    torch.manual_seed(train.seed)
    lm = attach(copy.deepcopy(model), list(range(discover(model).n_blocks)), settings.lora)
    lm.train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=train.lr)
    stream = batches or BatchStream(examples, train.batch_size, train.seed, pad_id)
    for _ in range(steps):
        batch = next(stream)
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        causal_lm_loss(logits, batch.labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return lm


def evaluator(lm: torch.nn.Module) -> Callable[[Batch], tuple[float, int]]:
    """(sum of token losses, tokens) of a whole model on a batch, like `step.split_eval`."""

    @torch.no_grad()
    def evaluate(batch: Batch) -> tuple[float, int]:
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return causal_lm_loss(logits, batch.labels).item() * batch.tokens, batch.tokens

    return evaluate
