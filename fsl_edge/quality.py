"""How good a federation's result is: held-out loss, perplexity and exact match, base vs tuned.

Scores are per site's held-out file (`heldout-<name>.jsonl` of a data folder) and over all of
them. The fine-tuned model is the base with both adapters as one peft model (`result.tuned_model`),
whose logits equal the federation's split forward (the export tests check it), so one model
serves both the loss and greedy generation with a KV cache.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import Batch, Sample, load_samples, pad_id_of, tokenize
from .errors import ConfigError, DataError
from .exact_match import RULE, Generate, exact_matches
from .result import FederationResult, load_base, tuned_model
from .simulation import eval_batches, heldout_losses
from .sites import site_files
from .split import causal_lm_loss, discover


@dataclass
class Scores:
    loss: float
    perplexity: float | None  # None: too large for a float
    exact_match: float | None  # None: the held-out data has no prompt/completion samples


@dataclass
class SiteScores:
    name: str  # a site's name, or "all"
    samples: int
    tokens: int  # tokens that carry loss
    base: Scores
    tuned: Scores


@dataclass
class Evaluation:
    checkpoint: str
    round: int | None
    model: str
    sites: list[SiteScores]
    overall: SiteScores
    exact_match_rule: str = RULE

    def to_json(self) -> dict:
        return asdict(self)


def greedy(lm: torch.nn.Module, eos_id: int | None) -> Generate:
    """Greedy decoding with a KV cache, one sample at a time (no padding to differ between
    models); stops before the eos token or at the model's last position."""
    from transformers import DynamicCache

    parts = discover(lm)
    limit = parts.pos_embed.num_embeddings if parts.pos_embed is not None else None
    device = parts.embed.weight.device
    inner = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    # transformers 5.2x renamed the forward's `past_key_values` to `cache`; the cache fills in place
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"

    @torch.no_grad()
    def generate(prompt: list[int], max_new: int) -> list[int]:
        if limit is not None:
            max_new = min(max_new, limit - len(prompt))
        ids, cache, new = torch.tensor([prompt], device=device), DynamicCache(), []
        for _ in range(max_new):
            logits = lm(input_ids=ids, use_cache=True, **{cache_arg: cache}).logits  # (1, T, V)
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
            ids = torch.tensor([[token]], device=device)
        return new

    return generate


def loss_of(lm: torch.nn.Module) -> Callable[[Batch], tuple[float, int]]:
    """(sum of token losses, tokens) of a batch, as the federation's evaluation computes it."""
    device = discover(lm).embed.weight.device

    @torch.no_grad()
    def evaluate(batch: Batch) -> tuple[float, int]:
        batch = batch.to(device)
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return causal_lm_loss(logits, batch.labels).item() * batch.tokens, batch.tokens

    return evaluate


def heldout_samples(data_dir: Path, names: list[str] | None, limit: int | None) -> dict[str, list[Sample]]:
    """Each site's held-out samples (the first `limit`), for the sites that have a held-out file."""
    files = site_files(data_dir)
    unknown = [n for n in names or [] if n not in files]
    if unknown:
        raise DataError(f"no site {unknown[0]!r} in {data_dir}; it has {', '.join(files)}")
    chosen = {n: held for n, (_, held) in files.items() if held and (not names or n in names)}
    if not chosen:
        raise DataError(f"no held-out files in {data_dir} for "
                        f"{', '.join(names or files)}: expected heldout-<site>.jsonl")
    return {n: load_samples(path)[:limit] for n, path in chosen.items()}


def evaluate_result(result: FederationResult, data_dir: Path | None = None,
                    sites: list[str] | None = None, samples: int | None = None,
                    exact_match: bool = True, model: str | None = None, device: str = "cpu",
                    on_step: Callable[[str], None] = lambda _: None) -> Evaluation:
    """Score the base model and the fine-tuned one on each site's held-out data and over all.
    `data_dir` defaults to the data a `fsl-edge simulate` run recorded; `samples` caps each site."""
    data_dir = data_dir or result.data
    if data_dir is None:
        raise ConfigError(f"{result.folder} does not record its data folder: pass --data")
    held = heldout_samples(Path(data_dir), sites, samples)
    on_step(f"loading the base model {model or result.model}")
    loaded = load_base(model or result.model, device=device)
    tokenizer, train = loaded.tokenizer, result.settings.train
    pad_id = pad_id_of(tokenizer)
    batches = {n: eval_batches(tokenize(s, tokenizer, train.max_len), train.batch_size, pad_id)
               for n, s in held.items()}
    tokens = {n: sum(b.tokens for b in bs) for n, bs in batches.items()}
    models = {"base": loaded.model, "tuned": tuned_model(loaded.model, result)}
    scores: dict[str, dict[str, Scores]] = {n: {} for n in [*held, "all"]}
    for which, lm in models.items():
        on_step(f"held-out loss of the {which} model")
        per, overall = heldout_losses(loss_of(lm), batches)
        generate = greedy(lm, tokenizer.eos_token_id)
        total_hits = total = 0
        for name, site_samples in held.items():
            hits, n = exact_matches(generate, tokenizer, site_samples) if exact_match else (0, 0)
            if exact_match and n:
                on_step(f"exact match of the {which} model on {name}: {hits}/{n}")
            total_hits, total = total_hits + hits, total + n
            scores[name][which] = _scores(per[name], hits, n)
        scores["all"][which] = _scores(overall, total_hits, total)
    rows = [SiteScores(n, len(held[n]), tokens[n], **scores[n]) for n in held]
    everything = SiteScores("all", sum(r.samples for r in rows), sum(tokens.values()), **scores["all"])
    return Evaluation(result.describe(), result.round, model or result.model, rows, everything)


def _scores(loss: float, hits: int, n: int) -> Scores:
    return Scores(loss, math.exp(loss) if loss < 700 else None, hits / n if n else None)
