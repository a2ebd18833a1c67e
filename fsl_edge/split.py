"""Cut a decoder-only causal LM at block boundaries, and run its segments.

The parts are found from the model's structure, not from per-model names: the input embedding
and output head through the HF accessors, the block list as the decoder's ModuleList of
`num_hidden_layers` entries, and each remaining child of the decoder classified by what it is
(absolute position embedding, rotary embedding, dropout, final norm). Anything the split cannot
place is refused with the reason, and `check_parity` proves on a real input that the composed
segments reproduce the model's own forward before anyone trains on them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedModelError


@dataclass
class ModelParts:
    """The pieces of a causal LM that the split moves around (shared with the model)."""

    model: nn.Module  # the causal LM as loaded (or peft-wrapped): owns every piece below
    config: object
    embed: nn.Module
    pos_embed: nn.Module | None  # absolute positions (GPT-2 family), else None
    rotary: nn.Module | None  # rotary embeddings computed once per forward (Llama family)
    dropout: nn.Module | None
    blocks: nn.ModuleList
    blocks_name: str  # attribute name of the block list, for peft's layers_pattern
    norm: nn.Module
    head: nn.Module

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.embed.weight.shape[1]


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft wrappers
    return get_base() if callable(get_base) else model


def discover(model: nn.Module) -> ModelParts:
    """Find the embedding, blocks, positional parts, final norm and head of a causal LM."""
    lm = _unwrap(model)
    config = getattr(lm, "config", None)
    name = type(lm).__name__
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is not supported: the split needs a decoder-only "
                                    "causal LM with a Hugging Face config")
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if decoder is None or head is None:
        raise UnsupportedModelError(f"{name} is not supported: it has no decoder stack or no "
                                    "output head (is it a causal LM?)")
    n_layers = config.get_text_config().num_hidden_layers
    embed = lm.get_input_embeddings()
    found: dict[str, list[tuple[str, nn.Module]]] = {k: [] for k in
                                                      ("blocks", "pos", "rotary", "drop", "norm", "other")}
    for child_name, child in decoder.named_children():
        if child is embed:
            continue
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            kind = "blocks"
        elif isinstance(child, nn.Embedding):
            kind = "pos"
        elif "rotary" in type(child).__name__.lower():
            kind = "rotary"
        elif isinstance(child, nn.Dropout):
            kind = "drop"
        elif isinstance(child, nn.LayerNorm) or "norm" in type(child).__name__.lower():
            kind = "norm"
        else:
            kind = "other"
        found[kind].append((child_name, child))
    if len(found["blocks"]) != 1:
        raise UnsupportedModelError(
            f"{name} is not supported: no recognisable block list (expected one ModuleList of "
            f"{n_layers} blocks in {type(decoder).__name__}, found {len(found['blocks'])})")
    if len(found["norm"]) != 1:
        raise UnsupportedModelError(f"{name} is not supported: expected one final norm in "
                                    f"{type(decoder).__name__}, found {len(found['norm'])}")
    for kind in ("pos", "rotary", "drop"):
        if len(found[kind]) > 1:
            found["other"] += found[kind]
    if found["other"]:
        names = ", ".join(f"{n} ({type(m).__name__})" for n, m in found["other"])
        raise UnsupportedModelError(f"{name} is not supported: the split does not know where "
                                    f"to run {names}")
    first = lambda kind: found[kind][0][1] if found[kind] else None  # noqa: E731
    blocks_name, blocks = found["blocks"][0]
    return ModelParts(model, config, embed, first("pos"), first("rotary"), first("drop"),
                      blocks, blocks_name, first("norm"), head)


# --- segment forwards ---------------------------------------------------------------------

def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for right-padded batches, as HF computes them when none are given."""
    B, T = attention_mask.shape
    return torch.arange(T, device=attention_mask.device).expand(B, T)  # (B, T)


def embed(parts: ModelParts, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T) -> hidden states (B, T, C) entering block 0."""
    h = parts.embed(input_ids)  # (B, T, C)
    if parts.pos_embed is not None:
        h = h + parts.pos_embed(position_ids)
    if parts.dropout is not None:
        h = parts.dropout(h)
    return h


def _mask_kind(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


@functools.cache
def _cache_arg() -> str:
    # transformers renamed the mask makers' `past_key_values` to `cache` (5.2x); take what it has
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"



def run_blocks(parts: ModelParts, h: torch.Tensor, start: int, stop: int,
               attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Run blocks [start, stop) on hidden states (B, T, C); masks are rebuilt from the (B, T) mask.

    The 4-D causal mask is made by transformers' own mask functions for the block's attention
    type, so padding and sliding windows behave exactly as in the model's forward.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    makers = {"full_attention": create_causal_mask,
              "sliding_attention": create_sliding_window_causal_mask}
    masks: dict[str, object] = {}
    extra = {}
    if parts.rotary is not None:
        extra["position_embeddings"] = parts.rotary(h, position_ids=position_ids)  # (cos, sin)
    for i in range(start, stop):
        kind = _mask_kind(parts.config, i)
        if kind not in makers:
            raise UnsupportedModelError(f"block {i} uses attention type {kind!r}, which the split "
                                        "does not support")
        if kind not in masks:
            masks[kind] = makers[kind](config=parts.config, inputs_embeds=h,
                                       attention_mask=attention_mask, position_ids=position_ids,
                                       **{_cache_arg(): None})
        out = parts.blocks[i](h, attention_mask=masks[kind], position_ids=position_ids, **extra)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, C)
    return h


def finish(parts: ModelParts, h: torch.Tensor) -> torch.Tensor:
    """Hidden states after the last block (B, T, C) -> logits (B, T, V)."""
    return parts.head(parts.norm(h))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, as HF's causal-LM loss computes it."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                           shift_labels.reshape(-1), ignore_index=-100)


def composed_logits(parts: ModelParts, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    cuts: tuple[int, ...] = ()) -> torch.Tensor:
    """Logits computed segment by segment, cut at each index in `cuts`."""
    pos = positions(attention_mask)
    h = embed(parts, input_ids, pos)
    bounds = [0, *cuts, parts.n_blocks]
    for start, stop in zip(bounds, bounds[1:]):
        h = run_blocks(parts, h, start, stop, attention_mask, pos)
    return finish(parts, h)


@torch.no_grad()
def check_parity(parts: ModelParts, cuts: tuple[int, ...], atol: float = 1e-4) -> float:
    """Compare the composed segments with the model's own forward on a short input.

    Raises UnsupportedModelError when they differ: the architecture does something between
    blocks that the split does not reproduce. Returns the largest absolute difference.
    """
    lm = _unwrap(parts.model)
    vocab = parts.embed.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=g).to(parts.embed.weight.device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding must be handled the same way too
    was_training = lm.training
    lm.eval()
    try:
        reference = lm(input_ids=ids, attention_mask=mask).logits
        try:
            mine = composed_logits(parts, ids, mask, cuts)
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            raise UnsupportedModelError(
                f"{type(lm).__name__} is not supported: its blocks need inputs the split does not "
                f"provide ({type(e).__name__}: {e})") from e
    finally:
        lm.train(was_training)
    valid = mask.bool()
    diff = (reference - mine).abs()[valid].max().item()
    scale = reference.abs()[valid].max().item()
    if not diff <= atol * max(1.0, scale):
        raise UnsupportedModelError(
            f"{type(lm).__name__} is not supported: its segments composed differ from its own "
            f"forward by {diff:.3g}; it computes something between blocks the split does not know")
    return diff


def drop_blocks(parts: ModelParts, keep: list[int]) -> None:
    """Free the blocks this party never runs (replaced by Identity, so indices stay stable)."""
    for i in range(parts.n_blocks):
        if i not in keep:
            parts.blocks[i] = nn.Identity()
