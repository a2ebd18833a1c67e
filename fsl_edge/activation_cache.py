"""A site-side disk cache of frozen-prefix activations, one file per sample, bounded and LRU.

The frozen prefix is deterministic given its fingerprint (model, cut, dtype, data, code: computed
by the caller), so its output for a sample can be read back instead of recomputed. Entries live
in ``folder/<fingerprint>/``; opening with a new fingerprint removes every other fingerprint's
entries. A hit is bit-identical to what was put. A bad entry is never an error: it is deleted,
counted, and reported as a miss so the caller recomputes.

Entry file layout (integers little-endian)::

    magic "FSLA" | version u8 | flags u8 (0) | len(meta) u16 | len(payload) u64 | crc32 u32
    meta     JSON {"key", "dtype", "shape", "stages"}, utf-8
    payload  codec.encode_tensor output
    crc32 covers the 16 header bytes before it, the meta and the payload.

LRU order is the files' mtimes (set on every put and hit), so it survives a restart.
"""

from __future__ import annotations

import json
import logging
import os
import string
import struct
import tempfile
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import unquote

import torch

from .codec import DTYPES, TensorMeta, build_pipeline, decode_tensor, encode_tensor
from .errors import CodecError, ConfigError

log = logging.getLogger(__name__)

# Lossless only. On randn(64, 576) x lognormal per-channel scales (T=64 is data.max_len's default;
# one thread), zstd level 1 makes files 7 % (float32, float16) to 20 % (bfloat16) smaller, i.e.
# that many more samples under max_bytes, for +0.1-0.2 ms per put and per get (raw: 0.2-0.3 ms).
# Adding shuffle saves 3 more points on float32 only and costs as much again; level 3+ gains
# nothing. At T=512 shuffle pays (bf16 0.72 vs 0.80 of raw): pass `pipeline` for long samples.
DEFAULT_PIPELINE = ("raw", "zstd:level=1")
MAGIC, VERSION = b"FSLA", 1
SUFFIX, TMP_SUFFIX = ".act", ".tmp"
_HEADER = struct.Struct("<4sBBHQ")  # magic, version, flags, len(meta), len(payload)
_CRC = struct.Struct("<I")
_MAX_META = 4096  # a key of <= 200 escaped bytes, a shape and a few stage specs fit many times over
_MAX_NDIM = 8
_SAFE = frozenset(string.ascii_letters + string.digits + "_-")  # never '.', so never '..' or '.tmp'
_HEX = frozenset("0123456789abcdef")


class _Corrupt(CodecError):
    """An entry on disk is unreadable; get() deletes it and reports a miss."""


@dataclass
class CacheStats:
    """Counters since this cache object was opened, plus what is on disk now."""

    hits: int = 0
    misses: int = 0  # includes the corrupt entries: the caller recomputed those too
    corrupt: int = 0
    evictions: int = 0
    invalidated: int = 0  # entries of other fingerprints removed
    skipped: int = 0  # puts not stored: larger than max_bytes alone, or the write failed
    entries: int = 0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {**asdict(self), "hit_rate": self.hit_rate}


def _entry_name(key: str) -> str:
    """Return the file name of a key; ConfigError if the key cannot name an entry.

    Characters outside [A-Za-z0-9_-] are %-escaped byte by byte (utf-8), so the mapping is
    one-to-one and no name can leave the folder or look like a temp file.
    """
    if not isinstance(key, str) or not key or key in (".", ".."):
        raise ConfigError(f"activation cache key {key!r} is invalid: expected a non-empty string, not '.' or '..'")
    bad = sorted({c for c in key if c in "/\\" or not c.isprintable()})
    if bad:
        raise ConfigError(f"activation cache key {key!r} is invalid: it holds {bad}; "
                          f"path separators and control characters are not allowed")
    name = "".join(chr(b) if chr(b) in _SAFE else f"%{b:02X}" for b in key.encode("utf-8")) + SUFFIX
    if len(name) > 200:
        raise ConfigError(f"activation cache key {key!r} is too long: {len(name)} bytes escaped, the limit is 200")
    return name


def _key_of(name: str) -> str | None:
    """Invert _entry_name; None for a name _entry_name would not have produced."""
    try:
        key = unquote(name.removesuffix(SUFFIX), errors="strict")
        return key if name.endswith(SUFFIX) and _entry_name(key) == name else None
    except (UnicodeDecodeError, ConfigError):
        return None


def _pack(key: str, t: torch.Tensor, pipeline: Sequence[str]) -> bytes:
    """Serialise one entry: header, meta JSON, payload (see the module docstring)."""
    payload, meta = encode_tensor(t, tuple(pipeline))
    meta_json = json.dumps({"key": key, "dtype": meta.dtype, "shape": list(meta.shape), "stages": list(meta.stages)},
                           separators=(",", ":")).encode()
    head = _HEADER.pack(MAGIC, VERSION, 0, len(meta_json), len(payload))
    crc = zlib.crc32(payload, zlib.crc32(meta_json, zlib.crc32(head)))
    return b"".join((head, _CRC.pack(crc), meta_json, payload))


def _unpack(data: bytes, key: str, max_bytes: int) -> torch.Tensor:
    """Validate and decode one entry stored under `key`; CodecError saying what is wrong."""
    fixed = _HEADER.size + _CRC.size
    if len(data) < fixed:
        raise _Corrupt(f"truncated: {len(data)} bytes, the header alone needs {fixed}")
    magic, version, flags, meta_len, payload_len = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or flags:
        raise _Corrupt(f"not a version-{VERSION} entry: magic {magic!r}, version {version}, flags {flags}")
    if meta_len > _MAX_META or payload_len > max_bytes or len(data) != fixed + meta_len + payload_len:
        raise _Corrupt(f"declares {meta_len} meta + {payload_len} payload bytes, the file holds {len(data) - fixed}")
    (crc,) = _CRC.unpack_from(data, _HEADER.size)
    view = memoryview(data)  # slices of a memoryview do not copy the payload
    if zlib.crc32(view[fixed:], zlib.crc32(view[: _HEADER.size])) != crc:
        raise _Corrupt("checksum mismatch")
    try:
        meta = json.loads(bytes(view[fixed : fixed + meta_len]))
        dtype, shape, stages = meta["dtype"], tuple(meta["shape"]), tuple(meta["stages"])
    except (ValueError, KeyError, TypeError) as e:  # a CRC-valid file from a buggy writer
        raise _Corrupt(f"meta is not the expected JSON object: {e}") from e
    if meta.get("key") != key or dtype not in DTYPES or len(shape) > _MAX_NDIM \
            or not all(type(d) is int for d in shape) or not all(isinstance(s, str) for s in stages):
        raise _Corrupt(f"meta {meta!r} does not describe a tensor stored under key {key!r}")
    # decode_tensor checks the declared shape against max_bytes before allocating anything.
    return decode_tensor(view[fixed + meta_len :], TensorMeta(dtype, shape, stages), max_bytes)


class ActivationCache:
    """Per-sample activations on disk under `folder/<fingerprint>/`, at most `max_bytes` of files.

    One process uses a folder at a time; a later ActivationCache on the same folder (a restart)
    sees the entries and the LRU order the previous one left.
    """

    def __init__(self, folder: Path, max_bytes: int, fingerprint: str, *,
                 pipeline: Sequence[str] = DEFAULT_PIPELINE):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError(f"activation cache max_bytes must be a positive int, got {max_bytes!r}")
        try:
            lossy = [s.name for s in build_pipeline(tuple(pipeline)) if not s.lossless]
        except CodecError as e:
            raise ConfigError(f"activation cache pipeline {tuple(pipeline)} is invalid: {e}") from e
        if lossy:
            raise ConfigError(f"activation cache pipeline {tuple(pipeline)} has lossy stages {lossy}; "
                              f"a hit must equal the recomputed activations bit for bit")
        self.folder, self.max_bytes, self.pipeline = Path(folder), max_bytes, tuple(pipeline)
        self._stats = CacheStats()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recent first
        self._bytes = 0
        self._clock = 0  # last mtime given out, in ns: strictly increasing so ties cannot reorder
        self.set_fingerprint(fingerprint)

    @property
    def stats(self) -> CacheStats:
        return replace(self._stats, entries=len(self._index), bytes=self._bytes)

    def path_of(self, key: str) -> Path:
        """The file that holds (or would hold) `key`'s entry; ConfigError for an invalid key."""
        return self.dir / _entry_name(key)

    def set_fingerprint(self, fingerprint: str) -> None:
        """Use `fingerprint`'s entries from now on; remove (and count) every other fingerprint's."""
        if not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= 128 or not set(fingerprint) <= _HEX:
            raise ConfigError(f"activation cache fingerprint {fingerprint!r} must be 1-128 lowercase hex digits")
        self.fingerprint, self.dir = fingerprint, self.folder / fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"activation cache folder {self.dir} cannot be created: {e}") from e
        for other in self.folder.iterdir():
            # Only hex-named folders are ours: a folder shared with other files loses nothing else.
            if other.name != fingerprint and other.is_dir() and set(other.name) <= _HEX:
                self._stats.invalidated += _remove_entries(other)
        self._load_index()

    def get(self, key: str) -> torch.Tensor | None:
        """Return the tensor put under `key`, or None on a miss (also for an unreadable entry)."""
        path = self.path_of(key)
        if key not in self._index:
            self._stats.misses += 1
            return None
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_bytes + 1)  # a stored entry is <= max_bytes; more is damage
            t = _unpack(data, key, self.max_bytes)
            self._touch(path)
        except (OSError, CodecError) as e:
            self._stats.misses += 1
            if not isinstance(e, FileNotFoundError):  # deleted by hand: a plain miss
                self._stats.corrupt += 1
                log.warning("activation cache: entry %r is unreadable (%s); deleted, will recompute", key, e)
            self._delete(key)
            return None
        self._index.move_to_end(key)
        self._stats.hits += 1
        return t

    def put(self, key: str, t: torch.Tensor) -> None:
        """Store `t` under `key` atomically, then evict least recently used entries to fit."""
        path = self.path_of(key)
        blob = _pack(key, t, self.pipeline)
        if len(blob) > self.max_bytes:
            return self._skip(key, f"{len(blob)} bytes encoded > max_bytes {self.max_bytes}")
        try:
            self._write(path, blob)
        except OSError as e:  # disk full and the like: a cache that cannot store is only slower
            return self._skip(key, str(e))
        self._bytes += len(blob) - self._index.pop(key, 0)
        self._index[key] = len(blob)
        self._evict_to_fit()  # the new entry fits alone, so it is never the victim

    def clear(self) -> None:
        """Delete every entry of the current fingerprint; counters are kept."""
        _remove_entries(self.dir, keep_dir=True)
        self._index.clear()
        self._bytes = 0

    def _write(self, path: Path, blob: bytes) -> None:
        # Same folder, so os.replace is atomic: a crash leaves a stray .tmp (swept at open), never
        # a partial entry under the final name. No fsync: if power loss tears the renamed file,
        # the CRC catches it on read and the sample is recomputed, so fsync would buy only latency.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            self._touch(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _skip(self, key: str, why: str) -> None:
        self._stats.skipped += 1
        log.info("activation cache: %r not stored: %s", key, why)
        self._delete(key)  # the old value must not outlive a put

    def _touch(self, path: Path) -> None:
        self._clock = max(time.time_ns(), self._clock + 1)
        os.utime(path, ns=(self._clock, self._clock))

    def _delete(self, key: str) -> None:
        self._bytes -= self._index.pop(key, 0)
        self.path_of(key).unlink(missing_ok=True)

    def _evict_to_fit(self) -> None:
        while self._bytes > self.max_bytes:
            self._delete(next(iter(self._index)))
            self._stats.evictions += 1

    def _load_index(self) -> None:
        """Rebuild the LRU index from the folder, oldest mtime first; sweep crash leftovers."""
        found = []
        for path in self.dir.iterdir():
            if _is_tmp(path):
                path.unlink(missing_ok=True)  # a put that never reached os.replace
            elif (key := _key_of(path.name)) is not None and path.is_file():
                st = path.stat()
                if st.st_size > self.max_bytes:  # damaged, or max_bytes shrank: it cannot stay
                    path.unlink(missing_ok=True)
                    self._stats.evictions += 1
                    continue
                found.append((st.st_mtime_ns, path.name, key, st.st_size))
        found.sort()
        self._index = OrderedDict((key, size) for _, _, key, size in found)
        self._bytes = sum(self._index.values())
        self._clock = max([self._clock] + [mtime for mtime, *_ in found])
        self._evict_to_fit()  # max_bytes may be smaller than last time


def _remove_entries(folder: Path, keep_dir: bool = False) -> int:
    """Delete the entries and temp files in `folder` (and it, if then empty); return the entries."""
    removed = 0
    for path in folder.iterdir():
        is_tmp = _is_tmp(path)
        if is_tmp or (_key_of(path.name) is not None and not path.is_dir()):
            path.unlink(missing_ok=True)
            removed += not is_tmp
    if not keep_dir:
        try:
            folder.rmdir()
        except OSError:  # something that is not ours is in there; leave it
            log.warning("activation cache: %s holds files that are not cache entries; left in place", folder)
    return removed


def _is_tmp(path: Path) -> bool:
    """A temp file of _write: a dot name (entry names never start with one) ending in .tmp."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and not path.is_dir()
