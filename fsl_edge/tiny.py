"""Tiny random-init models and a byte-level tokenizer: for tests and smoke runs only.

They are named `tiny-random-<family>` everywhere so nobody mistakes them for a real model.
They build in milliseconds, need no files, and cover the architecture families the split
supports (Llama, Qwen2, Mistral, GPT-2), which is what the parity tests need.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .errors import ModelError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Return a byte-level tokenizer with no merges: 256 byte tokens, then EOS and PAD."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab[EOS] = len(vocab)
    vocab[PAD] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


VOCAB = 258
_COMMON = dict(vocab_size=VOCAB, eos_token_id=256, pad_token_id=257)


def _configs():
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **_COMMON,
    )
    return {
        "llama": LlamaConfig(**llama_like, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**llama_like),
        # a window shorter than test sequences, so a wrong mask would show in the parity tests
        "mistral": MistralConfig(**llama_like, sliding_window=4),
        "gpt2": GPT2Config(
            n_embd=32, n_layer=6, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=256, **_COMMON,
        ),
    }


TINY_FAMILIES = tuple(_configs())


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """Build a 6-block random-init causal LM of `family` (llama, qwen2, mistral, gpt2), fp32."""
    configs = _configs()
    if family not in configs:
        raise ModelError(f"no tiny model for {family!r}; choose one of {', '.join(configs)}")
    torch.manual_seed(seed)
    config = configs[family]
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
