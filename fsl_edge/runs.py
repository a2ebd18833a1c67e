"""Run a whole simulated federation from files: model spec + data folder in, artefacts out.

What it writes to the run folder (all atomically): `metrics.json` (settings, per-round metrics),
`site_adapter.safetensors` (the federated site adapter), `server_adapter.safetensors` (the trunk
adapter). Together with the base model they are the fine-tuned model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .atomic import save_tensors, write_atomic
from .data import pad_id_of
from .icd10_data import build_icd10
from .models import load
from .config import LearningSettings
from .simulation import RoundMetrics, SimulationResult, simulate
from .sites import load_sites

DEMO_PER_SITE = 400  # training codes per demo site: a short CPU run still sees each once


def ensure_demo_data(data_dir: Path) -> Path:
    """Build the ICD-10 demo shards in `data_dir` unless a complete build is there."""
    if not (data_dir / "manifest.json").is_file():
        build_icd10(data_dir, per_site=DEMO_PER_SITE, heldout=64)
    return data_dir


def run_simulation(model_spec: str, data_dir: Path | None, out_dir: Path,
                   settings: LearningSettings, sites: list[str] | None = None,
                   on_round=None, on_loaded=None) -> SimulationResult:
    """Load the model and sites, simulate, and write the run's artefacts to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or ensure_demo_data(out_dir / "data")
    loaded = load(model_spec, device="auto", quantize=settings.lora.quantize)
    site_data = load_sites(data_dir, loaded.tokenizer, settings.train.max_len, sites)
    if on_loaded:
        on_loaded(loaded, site_data)
    # each site's prefix cache lives under the run folder, as an agent's under its workdir
    result = simulate(loaded.model, site_data, settings, pad_id_of(loaded.tokenizer), on_round,
                      cache_dir=out_dir / "cache")
    meta = {"model": loaded.source.describe(), "data": str(data_dir)}
    save_tensors(out_dir / "site_adapter.safetensors", result.site_adapter, meta)
    save_tensors(out_dir / "server_adapter.safetensors", result.server_adapter, meta)
    write_atomic(out_dir / "metrics.json", json.dumps({
        **meta, **result.metadata, "settings": settings.model_dump(mode="json"),
        "rounds": [asdict(r) for r in result.rounds]}, indent=2))
    return result


def summary(rounds: list[RoundMetrics]) -> dict:
    """Before/after held-out loss and the run's total traffic by message kind."""
    first, last = rounds[0], rounds[-1]
    traffic: dict[str, int] = {}
    for r in rounds:
        for kind, n in r.bytes.items():
            traffic[kind] = traffic.get(kind, 0) + n
    return {"heldout_before": first.heldout_loss_all, "heldout_after": last.heldout_loss_all,
            "seconds": sum(r.seconds for r in rounds), "bytes": traffic}
