"""A site's local dataset: load text files, tokenise with loss masks, batch deterministically.

Nothing here downloads anything: the data never leaves the site, and neither does this code reach
out. Formats: `.txt` (one sample per non-empty line) and `.jsonl` with `{"text": ...}` or
`{"prompt": ..., "completion": ...}` per line (loss on the completion only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fsl_edge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label torch's cross-entropy (and every HF model) skips
SUPPORTED_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Sample:
    """One training text; the loss covers `completion` only. `prompt` is "" for plain text."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Example:
    """One tokenised sample. `labels[i]` is the target at position i (HF models shift internally)."""

    input_ids: list[int]
    labels: list[int]


# -- loading -------------------------------------------------------------------------------------


def load_samples(path: str | Path) -> list[Sample]:
    """Read a `.txt` or `.jsonl` dataset; raise DataError naming the file and line of any fault."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a {' or '.join(SUPPORTED_SUFFIXES)} file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported extension {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")

    parse = _parse_text_line if suffix == ".txt" else _parse_json_line
    samples = [parse(path, lineno, line) for lineno, line in _lines(path)]
    if not samples:
        raise DataError(f"{path}: empty, expected at least one sample")
    return samples


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) for every line that is not blank."""
    # Decode line by line (not in text mode) so a bad byte is reported on its own line.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig drops the BOM some Windows editors put at the start of a file.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if line.strip():
                yield lineno, line


def _parse_text_line(path: Path, lineno: int, line: str) -> Sample:
    return Sample(prompt="", completion=line.strip())


def _parse_json_line(path: Path, lineno: int, line: str) -> Sample:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "completion" in record and "text" in record:
        raise DataError(f'{where}: has both "text" and "completion"; expected one or the other')
    if "completion" in record:
        if "prompt" not in record:
            raise DataError(f'{where}: has "completion" but no "prompt"')
        return Sample(_string(where, record, "prompt"), _string(where, record, "completion", nonempty=True))
    if "text" in record:
        return Sample("", _string(where, record, "text", nonempty=True))
    raise DataError(
        f'{where}: expected a "text" key or "prompt" and "completion" keys, found {sorted(record) or "none"}'
    )


def _string(where: str, record: dict[str, Any], key: str, nonempty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    if nonempty and not value:
        raise DataError(f'{where}: "{key}" is empty; there is nothing to learn from it')
    return value


# -- tokenising ----------------------------------------------------------------------------------


def tokenize(samples: Sequence[Sample], tokenizer: Any, max_len: int, pack: bool = False) -> list[Example]:
    """Tokenise `samples` into examples of at most `max_len` tokens, prompts masked with -100.

    Prompt and completion are tokenised separately (no special tokens) and concatenated, so the
    loss mask falls exactly on the boundary; the tokenizer's eos (if any) ends every sample and is
    a label. With `pack`, all samples form one stream cut into `max_len` chunks (no padding waste).
    Samples or chunks left without any label are dropped; a warning says how many.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be at least 1, got {max_len}")
    if not samples:
        raise DataError("no samples to tokenise")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # One batched call per side: fast tokenizers parallelise it.
    prompt_ids = tokenizer([s.prompt for s in samples], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([s.completion for s in samples], add_special_tokens=False)["input_ids"]

    whole = [
        Example(list(p) + list(c) + eos, [IGNORE_INDEX] * len(p) + list(c) + eos)
        for p, c in zip(prompt_ids, completion_ids)
    ]
    if pack:
        pieces = _chunk(whole, max_len)
    else:
        pieces = [Example(e.input_ids[:max_len], e.labels[:max_len]) for e in whole]
    examples = [e for e in pieces if any(label != IGNORE_INDEX for label in e.labels)]

    dropped = len(pieces) - len(examples)
    unit = "chunks" if pack else "samples"
    if not examples:
        raise DataError(f"all {len(pieces)} {unit} lost their completion to max_len={max_len}; raise max_len")
    if dropped:
        log.warning(
            "dropped %d of %d %s whose completion max_len=%d cut away", dropped, len(pieces), unit, max_len
        )
    return examples


def _chunk(examples: list[Example], max_len: int) -> list[Example]:
    # Labels travel with the ids, so packed prompt/completion data keeps its mask; the eos at the
    # end of every sample separates them in the stream.
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    return [Example(ids[i : i + max_len], labels[i : i + max_len]) for i in range(0, len(ids), max_len)]


def examples_digest(examples: Sequence[Example]) -> str:
    """Names a site's tokenised data: sample indices mean something only within the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in e.input_ids + e.labels))
    return h.hexdigest()[:32]


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else eos (masked out anyway), else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# -- batching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A padded batch; every tensor is (B, T) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    # where the samples come from: their indices in the site's examples (the keys of a site's
    # activation cache), and the epoch of the stream that drew them; () for evaluation batches
    ids: tuple[int, ...] = ()
    epoch: int = 0

    @property
    def tokens(self) -> int:
        """Tokens that carry loss (next-token targets, so column 0 never counts): the weight of
        this batch in token-weighted averages."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.ids, self.epoch)


def collate(examples: Sequence[Example], pad_id: int, ids: Sequence[int] = (), epoch: int = 0) -> Batch:
    """Right-pad `examples` to the longest one; padding is masked from attention and loss."""
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels, tuple(ids), epoch)


class BatchStream:
    """An endless, deterministic stream of batches: epoch e visits examples in Random(seed + e) order.

    The position (epoch, index within the epoch) is the whole state, so `state_dict()` taken after
    any batch resumes the exact same sequence. The last batch of an epoch may be smaller.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int) -> None:
        if not examples:
            raise DataError("no examples to batch")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.epoch, self.position = 0, 0
        self._order = self._order_of(0)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        picked = self._order[self.position : self.position + self.batch_size]
        epoch = self.epoch
        self.position += len(picked)
        if self.position >= len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._order_of(self.epoch)
        return collate([self.examples[i] for i in picked], self.pad_id, picked, epoch)

    def state_dict(self) -> dict[str, int]:
        # num_examples and seed are there to refuse a resume on different data, not to restore it.
        n = len(self.examples)
        return {"epoch": self.epoch, "position": self.position, "num_examples": n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = len(self.examples)
        if (state["num_examples"], state["seed"]) != (n, self.seed):
            raise DataError(
                f"cannot resume: the saved stream had {state['num_examples']} examples with seed "
                f"{state['seed']}, this one has {n} with seed {self.seed}"
            )
        if not 0 <= state["position"] < n:
            raise DataError(f"cannot resume: position {state['position']} is outside 0..{n - 1}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
