"""A causal LM as one ONNX graph for serving: input_ids, attention_mask (B, T) -> logits (B, T, V).

It uses torch.onnx's torch.export-based exporter, as `onnx_prefix` does (the TorchScript one is
deprecated and traces transformers' shape-dependent branches into constants), with the batch
and the sequence length dynamic. The graph is the model's own forward with the KV cache off: a
server scores whole sequences with it, or calls it once per generated token.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelError, UnsupportedModelError
from .onnx_prefix import _ort_errors, _quiet_exporter
from .split import discover

FILE = "model.onnx"
INPUTS, OUTPUT = ("input_ids", "attention_mask"), "logits"


class _LogitsGraph(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(lm: nn.Module, folder: Path, metadata: dict[str, str]) -> Path:
    """Write `folder/model.onnx` (weights embedded below protobuf's 2 GB limit, else in
    `model.onnx.data` beside it); `metadata` goes into the model's metadata_props."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs both, and says so less clearly)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError("the ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from e
    parts = discover(lm)
    # absolute position embeddings (GPT-2) cap the sequence length; rotary ones do not
    max_len = parts.pos_embed.num_embeddings if parts.pos_embed is not None else None
    T = torch.export.Dim("seq", min=1, max=max_len) if max_len else torch.export.Dim("seq", min=1)
    B = torch.export.Dim("batch", min=1)
    device = parts.embed.weight.device
    # batch 2 with one padded row: a batch of 1 or no padding would let the tracer specialise
    ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    graph = _LogitsGraph(lm).eval()
    with torch.no_grad(), _quiet_exporter(), warnings.catch_warnings():
        # both inputs share their axes on purpose; the exporter says so once per axis
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        try:
            program = torch.onnx.export(graph, (ids, mask), dynamo=True, verbose=False,
                                        input_names=list(INPUTS), output_names=[OUTPUT],
                                        dynamic_shapes={INPUTS[0]: {0: B, 1: T},
                                                        INPUTS[1]: {0: B, 1: T}})
        except (torch.onnx.OnnxExporterError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise UnsupportedModelError(f"{type(parts.model).__name__} cannot be exported to ONNX "
                                        f"({type(e).__name__}: {first})") from e
        program.model.metadata_props.update(metadata)
        path = folder / FILE
        program.save(path)
    return path


def onnx_logits(path: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                threads: int | None = None) -> torch.Tensor:
    """Run an exported model with ONNX Runtime's CPU provider: the serving check."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("checking the ONNX export needs ONNX Runtime: pip install onnxruntime-gpu "
                          "(it runs on the CPU too)") from e
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT], {INPUTS[0]: input_ids.cpu().numpy(),
                                           INPUTS[1]: attention_mask.cpu().numpy()})
    except _ort_errors() as e:
        raise ModelError(f"ONNX Runtime cannot run {path}: {e}") from e
    return torch.from_numpy(logits)  # (B, T, V) float32
