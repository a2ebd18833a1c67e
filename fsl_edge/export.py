"""Export a federation's result in standard formats: a peft adapter, a merged model, ONNX.

- peft: the site and trunk adapters as one adapter (`adapter_config.json` +
  `adapter_model.safetensors`) for `PeftModel.from_pretrained(base, folder)`; the config's
  `base_model_name_or_path` names the base model it was trained on.
- merged: the base model with the adapter folded into its weights, a plain Hugging Face folder
  (safetensors, config, tokenizer) for `AutoModelForCausalLM.from_pretrained`.
- onnx: the merged model as `model.onnx` (input_ids, attention_mask -> logits) plus the tokenizer.

Nothing appears at the destination unless every export passed its check: each is built in a
temporary folder beside it, loaded back the way a user would load it, and its logits on a probe
batch compared with the federation's own split forward; the differences are recorded in
`fsl-edge-export.json`. Then the folder is renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .evaluate import split_logits, split_parts
from .export_onnx import export_onnx, onnx_logits
from .result import FederationResult, load_base, read_result, tuned_model

FORMATS = ("peft", "merged", "onnx")
MANIFEST = "fsl-edge-export.json"
# Largest |logit| difference allowed, as a share of the largest |logit| (at least 1). The peft
# model runs the split's own operations on whole blocks: only summation order differs. Merging
# rounds W + s·BA once per weight, and ONNX Runtime uses other GEMM and softmax kernels, so both
# drift more with depth; measured on SmolLM2-135M (30 blocks) they stay below 1e-5 of the scale
# (README), and 1e-4 leaves room for deeper models while a wrong export is off by far more.
TOLERANCE = {"peft": 1e-5, "merged": 1e-4, "onnx": 1e-4}


@dataclass
class ExportOutcome:
    out: Path
    folders: dict[str, Path]  # format -> where it is
    max_diff: dict[str, float]  # format -> largest |logit| difference from the split forward
    scale: float  # largest |logit| of the split forward on the probe
    result: FederationResult


def parse_formats(value: str) -> tuple[str, ...]:
    """'all' or one format name -> the formats to write, in a fixed order."""
    if value == "all":
        return FORMATS
    if value not in FORMATS:
        raise ConfigError(f"unknown export format {value!r}: choose peft, merged, onnx or all")
    return (value,)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, formats: tuple[str, ...] = FORMATS,
           force: bool = False, model: str | None = None,
           on_step: Callable[[str], None] = lambda _: None) -> ExportOutcome:
    """Export the result in `checkpoint` to `out`: one format -> `out` is that folder; several ->
    one subfolder each. A non-empty `out` is replaced only with `force`. `model` overrides the
    base model the checkpoint names."""
    out = Path(out)
    _check_target(out, force)
    result = read_result(checkpoint)
    on_step(f"loading the base model {model or result.model}")
    loaded = load_base(model or result.model)
    base = loaded.model
    ids, mask = probe(base)
    site, server = split_parts(base, result.settings, result.site_adapter, result.server_adapter)
    reference = split_logits(site, server, ids, mask)  # (B, T, V)
    del site, server
    tuned = tuned_model(base, result)
    source = loaded.source
    base_name = str(source.path.resolve()) if source.kind == "folder" else source.spec
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folders = {f: tmp if len(formats) == 1 else tmp / f for f in formats}
        for folder in folders.values():
            folder.mkdir(exist_ok=True)
        logits: dict[str, torch.Tensor] = {}
        if "peft" in formats:
            on_step("writing the peft adapter")
            logits["peft"] = _peft(tuned, base, base_name, folders["peft"], ids, mask)
        if "merged" in formats or "onnx" in formats:
            merged = tuned.merge_and_unload()  # the last use of the peft wrapper: no copy
            if "merged" in formats:
                on_step("writing the merged model")
                logits["merged"] = _merged(merged, loaded.tokenizer, folders["merged"], ids, mask)
            if "onnx" in formats:
                on_step("exporting to ONNX (torch.export traces the model; this takes a while)")
                loaded.tokenizer.save_pretrained(folders["onnx"])
                path = export_onnx(merged, folders["onnx"], {"fsl_edge.base_model": base_name})
                logits["onnx"] = onnx_logits(path, ids, mask)
        valid = mask.bool()
        scale = reference.abs()[valid].max().item()
        diffs = {f: (reference - x).abs()[valid].max().item() for f, x in logits.items()}
        for f, d in diffs.items():
            if not d <= TOLERANCE[f] * max(1.0, scale):
                raise ModelError(f"the {f} export differs from the federation's split forward by "
                                 f"{d:.3g} (logits up to {scale:.3g}); nothing was written")
        manifest = {"base_model": base_name, "base_source": source.describe(),
                    "checkpoint": str(result.folder), "round": result.round,
                    "settings": result.settings.model_dump(mode="json"),
                    "formats": {f: str(p.relative_to(tmp)) for f, p in folders.items()},
                    "check": {"probe": list(ids.shape), "max_logit": scale,
                              "max_abs_diff": diffs, "tolerance": TOLERANCE}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _put_in_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportOutcome(out, {f: out / p.relative_to(tmp) for f, p in folders.items()}, diffs,
                         scale, result)


def probe(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (2, 16) batch of token ids, its second row padded: padding must survive export."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    return ids, mask


@torch.no_grad()
def _peft(tuned, base, base_name: str, folder: Path, ids, mask) -> torch.Tensor:
    from peft import PeftModel

    tuned.peft_config["default"].base_model_name_or_path = base_name
    # no LoRA on the embeddings: nothing to save there, and no need for peft to look up the base
    tuned.save_pretrained(folder, save_embedding_layers=False)
    with warnings.catch_warnings():
        # peft calls a transformers API that transformers 5 deprecates; nothing for us to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    return reloaded(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def _merged(merged, tokenizer, folder: Path, ids, mask) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    local_files_only=True).eval()
    return reloaded(input_ids=ids, attention_mask=mask).logits


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; it must be a folder (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty; use --force to replace it")


def _put_in_place(tmp: Path, out: Path) -> None:
    # os.replace moves a folder onto an absent or empty one only, so an old export is first
    # moved aside: `out` is missing for an instant, never half-written
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
