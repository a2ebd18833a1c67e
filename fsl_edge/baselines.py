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


def lora_model(model: torch.nn.Module, settings: LearningSettings,
               copy_model: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """LoRA on every block of `model` (a copy, unless told otherwise) in training mode, and its
    AdamW; the adapter's initialisation is seeded by the run's seed."""
    torch.manual_seed(settings.train.seed)
    base = copy.deepcopy(model) if copy_model else model
    lm = attach(base, list(range(discover(model).n_blocks)), settings.lora)
    lm.train()
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad],
                                  lr=settings.train.lr)
    return lm, optimizer


def train_steps(lm: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
                steps: int) -> tuple[float, int, int]:
    """`steps` optimizer steps of a whole model on the next batches; (mean loss, tokens,
    samples). The one step every unsplit row runs: centralised, a site alone, a Flower client."""
    loss_sum, tokens, samples = 0.0, 0, 0
    for _ in range(steps):
        batch = next(batches)
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = causal_lm_loss(logits, batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens, samples = loss_sum + loss.item(), tokens + batch.tokens, \
            samples + batch.input_ids.shape[0]
    return loss_sum / max(steps, 1), tokens, samples


def train_lora(model: torch.nn.Module, examples: Sequence[Example], settings: LearningSettings,
               steps: int, pad_id: int, batches: Iterator[Batch] | None = None) -> torch.nn.Module:
    """LoRA-train a copy of `model` for `steps` steps on shuffled batches of `examples` (or on
    the given `batches`); return the peft model."""
    lm, optimizer = lora_model(model, settings)
    train = settings.train
    stream = batches or BatchStream(examples, train.batch_size, train.seed, pad_id)
    train_steps(lm, optimizer, stream, steps)
    return lm


def evaluator(lm: torch.nn.Module) -> Callable[[Batch], tuple[float, int]]:
    """(sum of token losses, tokens) of a whole model on a batch, like `step.split_eval`."""

    @torch.no_grad()
    def evaluate(batch: Batch) -> tuple[float, int]:
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return causal_lm_loss(logits, batch.labels).item() * batch.tokens, batch.tokens

    return evaluate
