"""Loading, tokenising and batching a site's local data, with a real (tiny, byte-level) tokenizer."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fsl_edge.data import (
    IGNORE_INDEX,
    Batch,
    BatchStream,
    Example,
    Sample,
    collate,
    load_samples,
    pad_id_of,
    tokenize,
)
from fsl_edge.errors import ConfigError, DataError

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte of ASCII text is exactly one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {EOS: len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# -- loading -------------------------------------------------------------------------------------


def test_txt_one_sample_per_nonempty_line(tmp_path):
    path = write(tmp_path, "a.txt", "first line\n\n   \nsecond line  \n")
    assert load_samples(path) == [Sample("", "first line"), Sample("", "second line")]


def test_jsonl_text_and_prompt_completion_mix(tmp_path):
    rows = [{"text": "plain"}, {"prompt": "Q:", "completion": " A"}, {"prompt": "", "completion": "x"}]
    path = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_samples(path) == [Sample("", "plain"), Sample("Q:", " A"), Sample("", "x")]


def test_jsonl_with_utf8_bom(tmp_path):
    path = write(tmp_path, "a.jsonl", b'\xef\xbb\xbf{"text": "hi"}\n')
    assert load_samples(path) == [Sample("", "hi")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"text": "ok"', "malformed JSON"),
        ('["text"]', "expected a JSON object, got list"),
        ('{"body": "x"}', 'expected a "text" key or "prompt" and "completion" keys'),
        ('{"prompt": "x"}', 'expected a "text" key'),
        ('{"completion": "x"}', 'has "completion" but no "prompt"'),
        ('{"text": "a", "prompt": "b", "completion": "c"}', 'both "text" and "completion"'),
        ('{"text": 3}', '"text" must be a string, got int'),
        ('{"prompt": null, "completion": "x"}', '"prompt" must be a string, got NoneType'),
        ('{"prompt": "p", "completion": ["x"]}', '"completion" must be a string, got list'),
        ('{"text": ""}', '"text" is empty'),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, expected):
    path = write(tmp_path, "bad.jsonl", '{"text": "good"}\n\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_samples(path)
    assert f"{path}:3:" in str(err.value)  # blank line 2 still counts
    assert expected in str(err.value)


def test_invalid_utf8_names_line(tmp_path):
    path = write(tmp_path, "bad.txt", b"fine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: not valid UTF-8"):
        load_samples(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_samples(tmp_path / "nope.jsonl")


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory, expected a .txt or .jsonl file"):
        load_samples(tmp_path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "e.txt", content)
    with pytest.raises(DataError, match=re.escape(f"{path}: empty, expected at least one sample")):
        load_samples(path)


def test_unknown_extension_lists_supported(tmp_path):
    path = write(tmp_path, "a.csv", "x\n")
    with pytest.raises(DataError, match=r"a\.csv: unsupported extension '\.csv'; supported: \.txt, \.jsonl"):
        load_samples(path)


# -- tokenising ----------------------------------------------------------------------------------


def test_prompt_tokens_masked_exactly(tokenizer):
    eos = tokenizer.eos_token_id
    [ex] = tokenize([Sample("Q:", " yes")], tokenizer, max_len=64)
    assert ex.input_ids == tokenizer("Q: yes", add_special_tokens=False)["input_ids"] + [eos]
    assert ex.labels == [IGNORE_INDEX] * 2 + ex.input_ids[2:]
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX]) == " yes" + EOS


def test_plain_text_every_token_is_a_label(tokenizer):
    [ex] = tokenize([Sample("", "abc")], tokenizer, max_len=64)
    assert ex.labels == ex.input_ids and len(ex.input_ids) == 4  # 3 bytes + eos


def test_truncation_keeps_partial_and_drops_fully_masked(tokenizer, caplog):
    samples = [Sample("long prompt", " x"), Sample("ab", " cdef")]
    with caplog.at_level(logging.WARNING, logger="fsl_edge.data"):
        examples = tokenize(samples, tokenizer, max_len=4)
    assert len(examples) == 1  # the first lost its whole completion to the cut
    assert examples[0].input_ids == tokenizer("ab c", add_special_tokens=False)["input_ids"]
    assert examples[0].labels == [IGNORE_INDEX, IGNORE_INDEX] + examples[0].input_ids[2:]
    assert "dropped 1 of 2 samples" in caplog.text


def test_all_dropped_is_an_error(tokenizer):
    with pytest.raises(DataError, match="all 1 samples lost their completion to max_len=3"):
        tokenize([Sample("prompt", " answer")], tokenizer, max_len=3)


def test_bad_max_len(tokenizer):
    with pytest.raises(ConfigError, match="max_len must be at least 1"):
        tokenize([Sample("", "a")], tokenizer, max_len=0)


def test_packing_concatenates_with_eos_and_cuts(tokenizer):
    eos = tokenizer.eos_token_id
    examples = tokenize([Sample("", "abc"), Sample("", "de")], tokenizer, max_len=3, pack=True)
    stream = tokenizer("abc", add_special_tokens=False)["input_ids"] + [eos]
    stream += tokenizer("de", add_special_tokens=False)["input_ids"] + [eos]
    assert [e.input_ids for e in examples] == [stream[0:3], stream[3:6], stream[6:7]]
    assert all(e.labels == e.input_ids for e in examples)


def test_packing_keeps_prompt_mask(tokenizer):
    examples = tokenize([Sample("P", "c"), Sample("P", "d")], tokenizer, max_len=6, pack=True)
    assert len(examples) == 1
    assert examples[0].labels[0] == IGNORE_INDEX and examples[0].labels[3] == IGNORE_INDEX
    assert examples[0].labels[1] == examples[0].input_ids[1]


def test_pad_id_of(tokenizer):
    class Tok:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_id_of(tokenizer) == tokenizer.eos_token_id  # no pad token: fall back to eos
    assert pad_id_of(Tok(0, 5)) == 0
    assert pad_id_of(Tok(None, 5)) == 5
    assert pad_id_of(Tok(None, None)) == 0


# -- batching ------------------------------------------------------------------------------------


def test_collate_right_pads():
    batch = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.attention_mask, batch.labels))
    assert batch.tokens == 2  # next-token targets: column 0 is never predicted


def examples(n: int) -> list[Example]:
    return [Example([i, i], [i, i]) for i in range(n)]


def firsts(batch: Batch) -> list[int]:
    return batch.input_ids[:, 0].tolist()


def test_batch_stream_visits_every_example_each_epoch():
    stream = BatchStream(examples(10), batch_size=4, seed=0, pad_id=0)
    assert stream.batches_per_epoch == 3
    for epoch in range(3):
        batches = [next(stream) for _ in range(3)]
        assert [len(b.input_ids) for b in batches] == [4, 4, 2]  # the last batch is partial
        assert sorted(sum((firsts(b) for b in batches), [])) == list(range(10))
        assert stream.epoch == epoch + 1


def test_batch_stream_deterministic_and_seeded():
    def run(seed: int) -> list[list[int]]:
        stream = BatchStream(examples(20), batch_size=5, seed=seed, pad_id=0)
        return [firsts(next(stream)) for _ in range(8)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    first_two_epochs = run(1)
    assert first_two_epochs[:4] != first_two_epochs[4:]  # each epoch reshuffles


def test_batch_stream_resumes_exactly():
    a = BatchStream(examples(10), batch_size=3, seed=7, pad_id=0)
    for _ in range(5):  # into the second epoch
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # a checkpoint is JSON
    expected = [firsts(next(a)) for _ in range(6)]

    b = BatchStream(examples(10), batch_size=3, seed=7, pad_id=0)
    b.load_state_dict(state)
    assert [firsts(next(b)) for _ in range(6)] == expected


def test_batch_stream_refuses_other_data():
    state = BatchStream(examples(10), batch_size=3, seed=7, pad_id=0).state_dict()
    with pytest.raises(DataError, match="saved stream had 10 examples with seed 7, this one has 11"):
        BatchStream(examples(11), batch_size=3, seed=7, pad_id=0).load_state_dict(state)


def test_batch_stream_bad_arguments():
    with pytest.raises(DataError, match="no examples"):
        BatchStream([], batch_size=1, seed=0, pad_id=0)
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        BatchStream(examples(1), batch_size=0, seed=0, pad_id=0)


def test_end_to_end_from_file(tmp_path, tokenizer):
    path = write(tmp_path, "d.jsonl", '{"prompt": "ICD-10-CM I21.4:", "completion": " NSTEMI"}\n{"text": "hi"}\n')
    exs = tokenize(load_samples(path), tokenizer, max_len=32)
    batch = next(BatchStream(exs, batch_size=2, seed=0, pad_id=pad_id_of(tokenizer)))
    assert batch.input_ids.shape == (2, len("ICD-10-CM I21.4: NSTEMI") + 1)
    assert batch.tokens == len(" NSTEMI") + 1 + len("hi")  # "h" starts its row: no target
