"""Run a site's frozen prefix (input embedding + blocks [0, f)) with ONNX Runtime, or with torch.

The prefix has no trainable weights and is computed per sample, alone (batch 1, no padding), so
its output depends on the token ids only: it can be exported once and run by ONNX Runtime.
`TorchPrefix` and `OrtPrefix` take the same call, ids (T,) or (1, T) -> hidden (1, T, C) float32
on the CPU, so a caller can switch backends.

Export uses torch.onnx's torch.export-based exporter (the TorchScript one is deprecated and
traces transformers' shape-dependent Python branches, e.g. `q_length == 1`, into constants).
It runs `_PrefixGraph`, which builds the plain causal (or sliding-window) mask itself instead of
calling transformers.masking_utils: with no padding that mask is all the model would build, and
the tests check the wrapper's eager output against `split.run_blocks`.

The file is one `.onnx` with the weights embedded, so it is replaced atomically and cannot be
separated from its weights. Only a prefix over protobuf's 2 GB limit gets its weights in
`<name>.data` next to it (torch.onnx decides); that file must travel with the `.onnx`, and the
pair is replaced data first, so a reader racing a re-export of such a file can see a mismatch.
metadata_props record f, the hidden size and a fingerprint, checked when the file is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelError, SplitError, UnsupportedModelError
from .split import ModelParts, _mask_kind, discover, embed, positions, run_blocks

FORMAT = "fsl_edge.prefix_format"  # metadata keys; the format number changes with the graph's I/O
KEY_F, KEY_HIDDEN, KEY_FINGERPRINT, KEY_MAX_LEN = (
    "fsl_edge.prefix_blocks", "fsl_edge.hidden_size", "fsl_edge.fingerprint", "fsl_edge.max_length")
INPUT, OUTPUT = "input_ids", "hidden"


def _parts(model_or_parts: nn.Module | ModelParts) -> ModelParts:
    return model_or_parts if isinstance(model_or_parts, ModelParts) else discover(model_or_parts)


def _max_length(parts: ModelParts) -> int | None:
    # absolute position embeddings (GPT-2) cap T; rotary ones do not
    return parts.pos_embed.num_embeddings if parts.pos_embed is not None else None


class _PrefixGraph(nn.Module):
    """Token ids (1, T) -> hidden states (1, T, C) float32 after blocks [0, f), unpadded."""

    def __init__(self, parts: ModelParts, f: int):
        super().__init__()
        if not 0 <= f <= parts.n_blocks:
            raise SplitError(f"a prefix of {f} blocks does not fit a model of {parts.n_blocks}")
        self.parts, self.f = parts, f
        # registered here so that export and state_dict() see exactly the prefix's weights
        self.used = nn.ModuleList(m for m in (parts.embed, parts.pos_embed, parts.dropout,
                                              parts.rotary, *parts.blocks[:f]) if m is not None)

    def _mask(self, kind: str, T: int, h: torch.Tensor) -> torch.Tensor:
        i = torch.arange(T, device=h.device)
        allowed = i[None, :] <= i[:, None]  # (T, T): key position <= query position
        if kind == "sliding_attention":
            allowed = allowed & (i[None, :] > i[:, None] - self.parts.config.sliding_window)
        elif kind != "full_attention":
            raise UnsupportedModelError(f"attention type {kind!r} cannot be exported")
        allowed = allowed.view(1, 1, T, T)
        if getattr(self.parts.config, "_attn_implementation", "eager") == "sdpa":
            return allowed  # SDPA takes a boolean mask, as transformers gives it
        return torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(
            ~allowed, torch.finfo(h.dtype).min)  # eager attention adds the mask to the scores

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        h = embed(self.parts, input_ids, pos)  # (1, T, C)
        extra = {}
        if self.parts.rotary is not None:
            extra["position_embeddings"] = self.parts.rotary(h, position_ids=pos)  # (cos, sin)
        masks: dict[str, torch.Tensor] = {}
        for i in range(self.f):
            kind = _mask_kind(self.parts.config, i)
            if kind not in masks:
                masks[kind] = self._mask(kind, T, h)
            out = self.parts.blocks[i](h, attention_mask=masks[kind], position_ids=pos, **extra)
            h = out[0] if isinstance(out, tuple) else out  # (1, T, C)
        return h.float()


@contextmanager
def _eval_mode(module: nn.Module):
    """Dropout off inside, every submodule's own train/eval flag restored after."""
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def prefix_fingerprint(model_or_parts: nn.Module | ModelParts, f: int) -> str:
    """A hash of what the prefix computes with: the model type, f and every weight it uses."""
    parts = _parts(model_or_parts)
    digest = hashlib.sha256(f"{getattr(parts.config, 'model_type', '?')}|{f}".encode())
    for name, t in _PrefixGraph(parts, f).state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()[:32]


def _as_batch(input_ids: torch.Tensor, max_length: int | None) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ConfigError(f"the prefix takes one unpadded sample, ids of shape (T,) or (1, T) "
                          f"with T >= 1, not {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ConfigError(f"token ids must be integers, not {input_ids.dtype}")
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ConfigError(f"{input_ids.shape[1]} tokens exceed the model's {max_length} positions")
    return input_ids.long()  # (1, T)


class TorchPrefix:
    """Run the prefix in torch, as the reference computes it, with dropout off and no grad."""

    provider = "torch"

    def __init__(self, model_or_parts: nn.Module | ModelParts, f: int):
        self.parts = _parts(model_or_parts)
        self.graph = _PrefixGraph(self.parts, f)
        self.f, self.hidden_size = f, self.parts.hidden_size

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = _as_batch(input_ids, _max_length(self.parts)).to(self.parts.embed.weight.device)
        mask = torch.ones_like(ids)
        pos = positions(mask)
        with _eval_mode(self.graph):
            h = embed(self.parts, ids, pos)  # (1, T, C)
            h = run_blocks(self.parts, h, 0, self.f, mask, pos)  # (1, T, C)
        return h.float().cpu()


@contextmanager
def _quiet_exporter():
    """Hide the exporter's noise that is not about this model: it warns once per process that
    torchvision's ops cannot be registered, and torch.export's pytree raises a FutureWarning;"""
    # and the optimiser passes log every rewrite at INFO, hundreds of lines in an agent's log
    loggers = [logging.getLogger(name) for name in
               ("torch.onnx._internal.exporter._registration", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def export_prefix(model_or_parts: nn.Module | ModelParts, f: int, path: str | os.PathLike,
                  fingerprint: str | None = None) -> Path:
    """Export the prefix to an ONNX file at `path` (replaced atomically); return the path.

    The graph maps input_ids int64 (1, T) to hidden float32 (1, T, C) for any T. `fingerprint`
    is stored for `OrtPrefix(expect_fingerprint=...)`; by default it is `prefix_fingerprint`.
    Takes seconds even for a tiny model: torch.export traces and decomposes every op.
    """
    try:
        import onnx  # noqa: F401  (torch.onnx needs both, and says so less clearly)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError("exporting a prefix needs onnx and onnxscript: "
                          "pip install onnx onnxscript") from e
    parts = _parts(model_or_parts)
    graph = _PrefixGraph(parts, f)
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: {path.parent} is not a directory")
    max_len = _max_length(parts)
    T = torch.export.Dim("T", min=1, max=max_len) if max_len else torch.export.Dim("T", min=1)
    example = torch.zeros(1, min(8, max_len or 8), dtype=torch.long,
                          device=parts.embed.weight.device)
    with _eval_mode(graph), torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(graph, (example,), dynamo=True, verbose=False,
                                        input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes={INPUT: {1: T}})
        except (torch.onnx.OnnxExporterError, RuntimeError, ValueError, TypeError) as e:
            raise UnsupportedModelError(
                f"the {f}-block prefix of {type(parts.model).__name__} cannot be exported to "
                f"ONNX ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    program.model.metadata_props.update({
        FORMAT: "1", KEY_F: str(f), KEY_HIDDEN: str(parts.hidden_size),
        KEY_FINGERPRINT: fingerprint if fingerprint is not None else prefix_fingerprint(parts, f),
        **({KEY_MAX_LEN: str(max_len)} if max_len else {})})
    data = path.with_name(path.name + ".data")
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp = tmpdir / path.name  # same name: an external-data file is referenced by name
        program.save(tmp)
        tmp_data = tmpdir / data.name
        external = tmp_data.exists()
        if external:  # weights too large to embed: they must be in place before the graph
            _fsync(tmp_data)
            os.replace(tmp_data, data)
        _fsync(tmp)
        os.replace(tmp, path)
        if not external:
            data.unlink(missing_ok=True)  # left by an earlier, larger export to this path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError("the ONNX prefix backend needs ONNX Runtime: pip install onnxruntime-gpu "
                          "(it runs on the CPU too), or use TorchPrefix") from e
    return onnxruntime


def _providers(device: str) -> list[str | tuple[str, dict]]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    index = device.partition(":")[2]
    if device == "cuda" or (device.startswith("cuda:") and index.isdigit()):
        index = int(index or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    names = ("Fail", "InvalidArgument", "InvalidProtobuf", "InvalidGraph", "NoSuchFile",
             "NotImplemented", "RuntimeException", "EPFail")
    return (RuntimeError, *(getattr(C, n) for n in names if hasattr(C, n)))


class OrtPrefix:
    """Run an exported prefix with ONNX Runtime.

    `.provider` is the execution provider the session really uses: onnxruntime-gpu falls back
    to the CPU silently when CUDA cannot be loaded, so with device='auto' read it rather than
    assume; device='cuda' raises instead of falling back. The expect_* arguments refuse a file
    exported for another cut, model width or weights (see `prefix_fingerprint`).
    """

    def __init__(self, path: str | os.PathLike, device: str = "auto", *,
                 expect_f: int | None = None, expect_hidden: int | None = None,
                 expect_fingerprint: str | None = None, threads: int | None = None):
        ort = _import_ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"no exported prefix at {self.path}: run export_prefix first")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=_providers(device))
        except _ort_errors() as e:
            raise ModelError(f"{self.path} is not a loadable ONNX model: {e}") from e
        self.provider = self.session.get_providers()[0]
        if device.startswith("cuda") and self.provider != "CUDAExecutionProvider":
            raise ConfigError(f"device={device!r} but ONNX Runtime runs on {self.provider}: "
                              "its CUDA provider did not load. It needs onnxruntime-gpu (not "
                              "onnxruntime) and the CUDA and cuDNN major versions it was built "
                              "for: pip install 'onnxruntime-gpu[cuda,cudnn]' provides them")
        meta = self.session.get_modelmeta().custom_metadata_map
        names = ([i.name for i in self.session.get_inputs()],
                 [o.name for o in self.session.get_outputs()])
        if meta.get(FORMAT) != "1" or names != ([INPUT], [OUTPUT]):
            raise ModelError(f"{self.path} is an ONNX model but not a prefix exported by this "
                             "version of fsl-edge (export_prefix); export it again")
        self.f, self.hidden_size = int(meta[KEY_F]), int(meta[KEY_HIDDEN])
        self.fingerprint = meta[KEY_FINGERPRINT]
        self.max_length = int(meta[KEY_MAX_LEN]) if KEY_MAX_LEN in meta else None
        for what, want, got in (("f (blocks)", expect_f, self.f),
                                ("hidden size", expect_hidden, self.hidden_size),
                                ("fingerprint", expect_fingerprint, self.fingerprint)):
            if want is not None and want != got:
                raise ModelError(f"{self.path} was exported with {what} {got}, expected {want}: "
                                 "it belongs to another model or cut; export it again")

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = _as_batch(input_ids, self.max_length).cpu().contiguous().numpy()
        (hidden,) = self.session.run([OUTPUT], {INPUT: ids})
        return torch.from_numpy(hidden)  # (1, T, C) float32
