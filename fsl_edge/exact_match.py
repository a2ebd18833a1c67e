"""The exact-match rule for prompt/completion data, apart from any model (and from torch, so
the CLI can quote it in its help without loading one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data import Sample

RULE = ("a prompt/completion sample is an exact match when the completion generated greedily "
        "from the prompt (stopped at the end-of-sequence token, at most one token longer than "
        "the reference) equals the reference completion once whitespace is stripped from both "
        "ends of each")

Generate = Callable[[list[int], int], list[int]]  # prompt ids, most new tokens -> new ids


def is_exact_match(generated: str, reference: str) -> bool:
    """The rule on two texts: equal after stripping whitespace at both ends."""
    return generated.strip() == reference.strip()


def exact_matches(generate: Generate, tokenizer, samples: Sequence[Sample]) -> tuple[int, int]:
    """(matches, prompt/completion samples) under RULE; plain-text samples are skipped. Prompt
    and reference are tokenised without special tokens, as training tokenises them."""
    pairs = [s for s in samples if s.prompt]
    hits = 0
    for s in pairs:
        prompt = tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
        reference = tokenizer(s.completion, add_special_tokens=False)["input_ids"]
        # one token more than the reference: room for its eos; a longer answer is wrong anyway
        new = generate(list(prompt), len(reference) + 1)
        hits += is_exact_match(tokenizer.decode(new, skip_special_tokens=True), s.completion)
    return hits, len(pairs)
