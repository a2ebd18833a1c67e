"""The activation cache: bit-exact hits, LRU under a byte bound that survives restarts,
invalidation by fingerprint, and damaged entries that turn into misses instead of errors."""

import json
import os
import struct
import zlib

import pytest
import torch

from fsl_edge.activation_cache import ActivationCache
from fsl_edge.errors import ConfigError

FP, FP2 = "ab12" * 8, "cd34" * 8
MiB = 1 << 20


def activation(t: int, c: int = 64, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(c, generator=g))  # per-channel spread, like hidden states
    return (torch.randn(t, c, generator=g) * scales).to(dtype)  # (T, C)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (1, 1), (7, 576), (64, 576)], ids=str)
def test_round_trip_is_bit_exact(tmp_path, dtype, shape):
    cache = ActivationCache(tmp_path, MiB, FP)
    t = activation(*shape, dtype=dtype)
    t[0, 0], t[-1, -1] = float("nan"), -0.0  # special values keep their bits too
    cache.put("site-a:17", t)
    assert same_bits(cache.get("site-a:17"), t)
    assert same_bits(ActivationCache(tmp_path, MiB, FP).get("site-a:17"), t)  # and from disk alone


def test_miss_then_hit_is_counted(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    assert cache.get("17") is None
    cache.put("17", activation(5))
    assert cache.get("17") is not None
    s = cache.stats
    assert (s.hits, s.misses, s.entries, s.hit_rate) == (1, 1, 1, 0.5)
    assert s.bytes == cache.path_of("17").stat().st_size
    assert json.loads(json.dumps(s.as_dict()))["hit_rate"] == 0.5


def test_put_replaces_the_value_under_a_key(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.put("k", activation(3, seed=1))
    cache.put("k", activation(9, seed=2))
    assert same_bits(cache.get("k"), activation(9, seed=2))
    assert cache.stats.entries == 1 and cache.stats.bytes == cache.path_of("k").stat().st_size


def test_a_new_fingerprint_removes_the_old_entries(tmp_path):
    old = ActivationCache(tmp_path, MiB, FP)
    for k in "abc":
        old.put(k, activation(4))
    (tmp_path / "models").mkdir()  # not a fingerprint: the cache must leave it alone
    new = ActivationCache(tmp_path, MiB, FP2)
    assert new.stats.invalidated == 3 and new.stats.entries == 0
    assert not (tmp_path / FP).exists() and (tmp_path / "models").is_dir()
    assert new.get("a") is None
    new.put("a", activation(4))
    new.set_fingerprint(FP)  # switching on a live object invalidates too
    assert new.stats.invalidated == 4 and not (tmp_path / FP2).exists()


def test_entries_persist_across_a_new_instance(tmp_path):
    ActivationCache(tmp_path, MiB, FP).put("s1", activation(8))
    again = ActivationCache(tmp_path, MiB, FP)
    assert again.stats.entries == 1
    assert same_bits(again.get("s1"), activation(8))


def lru_cache(tmp_path) -> tuple[ActivationCache, int]:
    """A cache that holds three equal-sized entries (raw pipeline: sizes are exact)."""
    probe = ActivationCache(tmp_path / "probe", MiB, FP, pipeline=("raw",))
    probe.put("a", activation(16))
    size = probe.stats.bytes
    return ActivationCache(tmp_path / "c", 3 * size + size // 2, FP, pipeline=("raw",)), size


def test_the_least_recently_read_entry_is_evicted_first(tmp_path):
    cache, size = lru_cache(tmp_path)
    for k in "abc":
        cache.put(k, activation(16))
    assert cache.get("a") is not None  # now b is the least recently used
    cache.put("d", activation(16))
    assert cache.stats.evictions == 1 and cache.stats.bytes == 3 * size
    assert not cache.path_of("b").exists()
    assert [cache.get(k) is not None for k in "abcd"] == [True, False, True, True]


def test_lru_order_survives_a_restart(tmp_path):
    cache, _ = lru_cache(tmp_path)
    for k in "abc":
        cache.put(k, activation(16))
    cache.get("a")
    cache.get("b")  # c is now the oldest
    again = ActivationCache(cache.folder, cache.max_bytes, FP, pipeline=("raw",))
    again.put("d", activation(16))
    assert [again.get(k) is not None for k in "abcd"] == [True, True, False, True]


def test_a_smaller_bound_at_reopen_evicts_the_oldest(tmp_path):
    cache, size = lru_cache(tmp_path)
    for k in "abc":
        cache.put(k, activation(16))
    smaller = ActivationCache(cache.folder, 2 * size, FP, pipeline=("raw",))
    assert smaller.stats.evictions == 1 and smaller.get("a") is None and smaller.get("c") is not None


def test_an_entry_larger_than_the_bound_is_skipped(tmp_path):
    cache = ActivationCache(tmp_path, 10_000, FP)
    cache.put("k", activation(2))
    cache.put("k", activation(500))  # too large: the old value must not be served for it either
    assert cache.stats.skipped == 1 and cache.stats.entries == 0 and cache.stats.bytes == 0
    assert cache.get("k") is None and not cache.path_of("k").exists()


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip(offset: int):
    def damage(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset] ^= 0x10
        return bytes(b)
    return damage


DAMAGE = {
    "truncated": truncate,
    "payload-bit": flip(-1),
    "magic-bit": flip(0),
    "version-bit": flip(4),
    "meta-length-bit": flip(6),
    "payload-length-bit": flip(12),
    "crc-bit": flip(16),
    "meta-bit": flip(22),
    "garbage": lambda data: os.urandom(len(data)),
    "zero-length": lambda data: b"",
    "grown": lambda data: data + b"\0" * 70_000,  # larger than max_bytes: not even read whole
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
@pytest.mark.parametrize("restart", [False, True], ids=["live", "restart"])
def test_a_damaged_entry_is_a_counted_miss(tmp_path, damage, restart):
    cache = ActivationCache(tmp_path, 65_536, FP)
    cache.put("k", activation(32, dtype=torch.bfloat16))
    path = cache.path_of("k")
    path.write_bytes(damage(path.read_bytes()))
    if restart:
        cache = ActivationCache(tmp_path, 65_536, FP)
    assert cache.get("k") is None
    # At open a file over max_bytes is evicted unread: it cannot fit, whatever it holds.
    oversize_at_open = restart and damage is DAMAGE["grown"]
    assert (cache.stats.corrupt, cache.stats.evictions) == ((0, 1) if oversize_at_open else (1, 0))
    assert (cache.stats.misses, cache.stats.entries) == (1, 0)
    assert not path.exists()
    cache.put("k", activation(32, dtype=torch.bfloat16))  # the caller recomputed; all is well again
    assert same_bits(cache.get("k"), activation(32, dtype=torch.bfloat16))


def test_an_entry_under_another_keys_name_is_refused(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.put("a", activation(4))
    os.replace(cache.path_of("a"), cache.path_of("b"))  # valid file, wrong name: not b's value
    cache = ActivationCache(tmp_path, MiB, FP)
    assert cache.get("b") is None and cache.stats.corrupt == 1


def test_a_file_deleted_behind_the_caches_back_is_a_plain_miss(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.put("a", activation(4))
    cache.path_of("a").unlink()
    assert cache.get("a") is None and cache.stats.corrupt == 0 and cache.stats.entries == 0


def test_stray_temp_files_are_swept_at_open(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.put("a", activation(4))
    stray = cache.dir / ".b.act.x1y2.tmp"  # what a crash between write and os.replace leaves
    stray.write_bytes(b"half an entry")
    foreign = [cache.dir / "notes.txt", cache.dir / "keep.tmp"]
    for path in foreign:
        path.write_text("not ours")
    again = ActivationCache(tmp_path, MiB, FP)
    assert not stray.exists() and all(path.exists() for path in foreign)
    assert again.stats.entries == 1 and again.get("a") is not None


@pytest.mark.parametrize("key", ["", ".", "..", "a/b", "../etc/passwd", "a\\b", "a\0b", "a\nb", 17])
def test_bad_keys_are_refused_by_name(tmp_path, key):
    cache = ActivationCache(tmp_path, MiB, FP)
    for call in (lambda: cache.put(key, activation(2)), lambda: cache.get(key)):
        with pytest.raises(ConfigError, match="key") as e:
            call()
        assert repr(key) in str(e.value)
    assert list(cache.dir.iterdir()) == []


def test_unusual_keys_are_escaped_into_distinct_files_inside_the_folder(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    keys = ["site-a:17", "a.b", "a b", "A", "%41", "ü", "x" * 60]
    for i, k in enumerate(keys):
        cache.put(k, activation(2, seed=i))
    assert len({cache.path_of(k) for k in keys}) == len(keys)
    assert all(cache.path_of(k).parent == cache.dir for k in keys)
    again = ActivationCache(tmp_path, MiB, FP)
    assert all(same_bits(again.get(k), activation(2, seed=i)) for i, k in enumerate(keys))
    with pytest.raises(ConfigError, match="too long"):
        cache.put("ü" * 40, activation(2))


def test_clear_removes_the_entries_and_keeps_the_counters(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.put("a", activation(4))
    cache.get("a")
    cache.clear()
    assert list(cache.dir.iterdir()) == []
    assert (cache.stats.entries, cache.stats.bytes, cache.stats.hits) == (0, 0, 1)
    assert cache.get("a") is None


@pytest.mark.parametrize("kwargs, match", [
    ({"fingerprint": "XYZ"}, "fingerprint"),
    ({"fingerprint": "../ab"}, "fingerprint"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"pipeline": ("cast:to=float16", "raw")}, "lossy"),
    ({"pipeline": ("zstd",)}, "pipeline"),
])
def test_bad_settings_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ActivationCache(**{"folder": tmp_path, "max_bytes": MiB, "fingerprint": FP, **kwargs})


def test_every_single_byte_flip_is_caught(tmp_path):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.put("k", activation(1, 4))
    good = cache.path_of("k").read_bytes()
    for offset in range(len(good)):
        cache.path_of("k").write_bytes(flip(offset)(good))
        assert cache.get("k") is None, f"a flip at byte {offset} went unnoticed"
        cache.put("k", activation(1, 4))
    assert cache.stats.corrupt == len(good)


def forged(meta: dict, payload: bytes) -> bytes:
    """An entry with a valid checksum around whatever meta it is given (a buggy writer's)."""
    meta_json = json.dumps(meta).encode()
    head = struct.pack("<4sBBHQ", b"FSLA", 1, 0, len(meta_json), len(payload))
    crc = zlib.crc32(head + meta_json + payload)
    return head + struct.pack("<I", crc) + meta_json + payload


@pytest.mark.parametrize("meta", [
    {"key": "k", "dtype": "float32", "shape": [10**12, 10**12], "stages": ["raw"]},  # never allocated
    {"key": "k", "dtype": "float32", "shape": [-1, 2], "stages": ["raw"]},
    {"key": "k", "dtype": "float32", "shape": [3], "stages": ["raw"]},  # 3 floats are not 8 bytes
    {"key": "k", "dtype": "complex64", "shape": [2], "stages": ["raw"]},
    {"key": "k", "dtype": "float32", "shape": [2], "stages": ["pickle"]},
    {"key": "k", "dtype": "float32", "shape": [2], "stages": ["raw", "zstd"]},  # payload is no frame
    {"key": "k", "dtype": "float32", "shape": "2", "stages": ["raw"]},
    {"key": "k", "dtype": "float32", "shape": [2]},
    {"key": "other", "dtype": "float32", "shape": [2], "stages": ["raw"]},
    ["not", "an", "object"],
], ids=repr)
def test_a_well_checksummed_but_invalid_entry_is_a_counted_miss(tmp_path, meta):
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.path_of("k").write_bytes(forged(meta, b"\0" * 8))
    cache = ActivationCache(tmp_path, MiB, FP)
    assert cache.get("k") is None and cache.stats.corrupt == 1 and not cache.path_of("k").exists()


def test_the_forger_writes_the_real_format(tmp_path):
    """The control for the test above: a forged entry with sound meta is a hit."""
    cache = ActivationCache(tmp_path, MiB, FP)
    cache.path_of("k").write_bytes(forged({"key": "k", "dtype": "float32", "shape": [2], "stages": ["raw"]}, b"\0" * 8))
    assert torch.equal(ActivationCache(tmp_path, MiB, FP).get("k"), torch.zeros(2))
