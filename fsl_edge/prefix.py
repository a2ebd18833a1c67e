"""The site's frozen prefix: computed one sample at a time, cached, fingerprinted; the server's
copies of it when sites send keys instead of activations.

A prefix (embeddings + the first blocks, nothing trainable) maps a sample's tokens to the same
hidden states every epoch. To make a cached output *bit-identical* to a recomputed one it is
computed for each sample alone, at its own length (batch 1, no padding): a batched forward rounds
differently depending on what else is in the batch. Padding positions of the assembled batch
are zeros; attention masks keep them out of every valid position.

The fingerprint names everything that determines the outputs: the prefix's weights (LoRA ones
included, when a selection policy froze LoRA blocks), its length, the model config, the torch and
transformers versions, the backend and this computation rule. The cache is invalidated when it
changes; the server's copies are dropped when a site announces a new one.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from .data import Batch
from .errors import ProtocolError
from .split import ModelParts

RULE = "per-sample-unpadded-eval-v2"  # bump when the way a prefix output is computed changes


class MissingKeys(ProtocolError):
    """The server no longer holds the prefix activations of some keys; the site must send them."""

    def __init__(self, site: str, missing: list[int]):
        super().__init__(f"the server holds no prefix activation for {len(missing)} key(s) of "
                         f"{site} (e.g. {missing[:3]}): send the activations again")
        self.missing = missing


def _digest(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").digest()


def sample_key(input_ids: torch.Tensor) -> str:
    """A cache key from a sample's tokens: the same text has the same key in every epoch."""
    return hashlib.blake2b(input_ids.to(torch.int64).numpy().tobytes(), digest_size=16).hexdigest()


def resolve_backend(name: str, device: torch.device) -> str:
    """auto -> onnxruntime on a CPU (measured faster there), torch on a GPU (not measured)."""
    if name != "auto":
        return name
    if device.type != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


class SitePrefix:
    """Computes blocks [0, length) of a site's model per sample, through an optional cache.

    `cache` is (folder, max_bytes) of an on-disk `ActivationCache`, opened at first use (with
    the fingerprint it must hold), or None. `static` is the length of the prefix that has no
    LoRA at all (`prefix.frozen`): only it runs on ONNX Runtime, exported once; a longer prefix
    (blocks a selection policy froze, whose LoRA weights move with every aggregation) runs in
    torch, so a changed weight costs a recompute, never a new export inside a step.
    """

    def __init__(self, parts: ModelParts, backend_name: str = "auto", cache=None, static: int = 0):
        self.parts, self.cache_at, self.cache, self.static = parts, cache, None, static
        self.device, self.dtype = parts.embed.weight.device, parts.embed.weight.dtype
        self.backend_name = resolve_backend(backend_name, self.device)
        self.provider: str | None = None  # what really computed the last prefix
        self._base_digests: dict[str, bytes] = {}  # frozen base weights never change
        self._forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # by fingerprint
        self._scratch: tempfile.TemporaryDirectory | None = None  # exports without a cache folder
        self.computed = 0  # samples whose prefix was computed here (not read from the cache)

    def backend_of(self, length: int) -> str:
        return "onnxruntime" if self.backend_name == "onnxruntime" and length == self.static else "torch"

    def forward(self, length: int, fingerprint: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function from one sample's ids (T,) to its prefix output (1, T, C), on the CPU."""
        if fingerprint not in self._forwards:
            if self.backend_of(length) == "onnxruntime":
                run = self._onnx(length, fingerprint)
            else:
                from .onnx_prefix import TorchPrefix  # dropout off, no grad: the reference

                run = TorchPrefix(self.parts, length)
            self.provider = run.provider if run.provider == "torch" else f"onnxruntime {run.provider}"
            self._forwards = {fingerprint: run}  # one prefix at a time: free the last one
        return self._forwards[fingerprint]

    def _onnx(self, length: int, fingerprint: str):
        """The prefix exported to ONNX (once per fingerprint, kept next to the cache)."""
        from .onnx_prefix import OrtPrefix, export_prefix

        if self.cache_at is not None:
            folder = Path(self.cache_at[0]) / "onnx"
        else:
            self._scratch = self._scratch or tempfile.TemporaryDirectory(prefix="fsl-edge-onnx-")
            folder = Path(self._scratch.name)
        path = folder / f"{fingerprint}.onnx"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.onnx"):  # another prefix's: hundreds of MB each
                old.unlink(missing_ok=True)
            export_prefix(self.parts, length, path, fingerprint=fingerprint)
        return OrtPrefix(path, "cuda" if self.device.type == "cuda" else "cpu",
                         expect_f=length, expect_fingerprint=fingerprint)

    def fingerprint(self, length: int) -> str:
        import transformers

        backend = {"name": self.backend_of(length), "device": str(self.device),
                   "torch": torch.__version__, "transformers": transformers.__version__}
        if self.device.type == "cuda":
            backend["gpu"] = torch.cuda.get_device_name(self.device)
        if backend["name"] == "onnxruntime":
            import onnxruntime

            backend["onnxruntime"] = onnxruntime.__version__
        h = hashlib.sha256(json.dumps({
            "rule": RULE, "length": length, "backend": backend,
            "config": self.parts.config.to_dict()}, sort_keys=True, default=str).encode())
        modules = [("embed", self.parts.embed), ("pos", self.parts.pos_embed),
                   ("rotary", self.parts.rotary)] + [(f"block{i}", self.parts.blocks[i])
                                                      for i in range(length)]
        for prefix, module in modules:
            if module is None:
                continue
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                key = f"{prefix}.{name}"
                if "lora_" in name:  # LoRA weights are loaded anew every round: hash them each time
                    digest = _digest(t)
                else:
                    digest = self._base_digests.get(key) or self._base_digests.setdefault(key, _digest(t))
                h.update(key.encode() + digest)
        return h.hexdigest()[:32]

    def prepare(self, length: int) -> None:
        """Build the backend for a prefix now (an ONNX export takes seconds), not in a step,
        where the split server would wait on it."""
        if length:
            self.forward(length, self.fingerprint(length))

    def open_cache(self, fingerprint: str):
        if self.cache_at is None:
            return None
        if self.cache is None:
            from .activation_cache import ActivationCache

            self.cache = ActivationCache(self.cache_at[0], self.cache_at[1], fingerprint)
        elif self.cache.fingerprint != fingerprint:  # (re)indexing reads the whole folder
            self.cache.set_fingerprint(fingerprint)
        return self.cache

    def batch(self, batch: Batch, length: int, cached: bool = True) -> tuple[torch.Tensor, str]:
        """The prefix outputs of a right-padded batch (B, T, C), zeros at padding, and the
        fingerprint they were computed under; through the cache if `cached` (and there is one)."""
        fingerprint = self.fingerprint(length)
        cache = self.open_cache(fingerprint) if cached else None
        mask = batch.attention_mask.cpu()
        ids_cpu = batch.input_ids.cpu()
        lengths = mask.sum(dim=1).tolist()
        out = torch.zeros((len(lengths), mask.shape[1], self.parts.hidden_size), dtype=self.dtype,
                          device=batch.input_ids.device)
        for i, n in enumerate(lengths):
            if n == 0 or not bool(mask[i, :n].all()):
                raise ValueError("the frozen prefix needs right-padded batches with a token first")
            ids = ids_cpu[i, :n]
            key = sample_key(ids)
            h = cache.get(key) if cache is not None else None
            if h is None:
                h = self.forward(length, fingerprint)(ids)[0]  # (n, C), CPU
                self.computed += 1
                if cache is not None:
                    cache.put(key, h)
            out[i, :n] = h.to(out.device, out.dtype)
        return out, fingerprint


class PrefixStore:
    """The server's copies of sites' prefix activations, by (site, prefix fingerprint, key),
    bounded in bytes, least recently used dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[str, str, int], torch.Tensor] = OrderedDict()
        self.fingerprints: dict[str, str] = {}
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0

    def _drop(self, entry: tuple[str, str, int]) -> None:
        t = self.entries.pop(entry)
        self.bytes -= t.numel() * t.element_size()

    def _site(self, site: str, fingerprint: str) -> None:
        if self.fingerprints.get(site) != fingerprint:  # the site's prefix changed: old copies are stale
            for entry in [e for e in self.entries if e[0] == site]:
                self._drop(entry)
            self.fingerprints[site] = fingerprint

    def put(self, site: str, fingerprint: str, keys: list[int], hidden: torch.Tensor,
            mask: torch.Tensor) -> None:
        self._site(site, fingerprint)
        for i, key in enumerate(keys):
            entry = (site, fingerprint, key)
            if entry in self.entries:
                self._drop(entry)
            n = int(mask[i].sum())
            t = hidden[i, :n].detach().clone()
            self.entries[entry] = t
            self.bytes += t.numel() * t.element_size()
        while self.bytes > self.max_bytes and self.entries:
            self._drop(next(iter(self.entries)))
            self.evicted += 1

    def get(self, site: str, fingerprint: str, keys: list[int], mask: torch.Tensor) -> torch.Tensor:
        """The batch (B, T, C) rebuilt from the copies, or MissingKeys naming what is gone."""
        self._site(site, fingerprint)
        missing = [k for k in keys if (site, fingerprint, k) not in self.entries]
        if missing:
            self.misses += len(missing)
            raise MissingKeys(site, missing)
        parts = [self.entries[(site, fingerprint, k)] for k in keys]
        out = parts[0].new_zeros((len(keys), mask.shape[1], parts[0].shape[-1]))
        for i, (key, t) in enumerate(zip(keys, parts)):
            if t.shape[0] != int(mask[i].sum()):
                raise ProtocolError(f"key {key} of {site} names a sample of {t.shape[0]} tokens; "
                                    f"the mask says {int(mask[i].sum())}")
            out[i, :t.shape[0]] = t
            self.entries.move_to_end((site, fingerprint, key))
        self.hits += len(keys)
        return out

    def as_dict(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evicted": self.evicted}
