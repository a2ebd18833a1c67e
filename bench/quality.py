"""Quality benchmark: does the split federation learn as well as pooling the data would?

SmolLM2-135M (real weights) on the ICD-10-CM demo sites, all rows in one run with the same
steps, batch and tokens per step. Rows: the base model; fsl-edge (u-shape, FedAvg of the site
adapters every round); centralised LoRA on the union of the sites' data; each site training alone.
Held-out loss is measured per chapter (codes no site trained on) and over all chapters.

    .venv/bin/python bench/quality.py            # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, write_section  # noqa: E402

from fsl_edge.baselines import evaluator, train_lora  # noqa: E402
from fsl_edge.config import LoraSettings, SplitSettings, TrainSettings  # noqa: E402
from fsl_edge.data import pad_id_of  # noqa: E402
from fsl_edge.icd10_data import build_icd10  # noqa: E402
from fsl_edge.models import load  # noqa: E402
from fsl_edge.config import LearningSettings  # noqa: E402
from fsl_edge.data import BatchStream  # noqa: E402
from fsl_edge.evaluate import split_evaluator  # noqa: E402
from fsl_edge.simulation import (SiteData, eval_batches, heldout_losses, simulate,  # noqa: E402
                                 site_seed)
from fsl_edge.sites import load_sites  # noqa: E402
from fsl_edge.split import discover  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--per-site", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-quality")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()

    data_dir = args.workdir / "data"
    build_icd10(data_dir, per_site=args.per_site, heldout=args.heldout, seed=args.seed)
    loaded = load(args.model)
    pad = pad_id_of(loaded.tokenizer)
    sites = load_sites(data_dir, loaded.tokenizer, args.max_len)
    settings = LearningSettings(
        split=SplitSettings(), lora=LoraSettings(rank=8),
        train=TrainSettings(lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                            rounds=args.rounds, steps=args.steps, seed=args.seed))
    heldout = {s.name: eval_batches(s.heldout, args.batch_size, pad) for s in sites}
    site_steps = args.rounds * args.steps
    rows: list[tuple[str, dict[str, float], float, float]] = []

    def measure(name: str, evaluate, seconds: float) -> None:
        per, overall = heldout_losses(evaluate, heldout)
        rows.append((name, per, overall, seconds))
        print(f"{name:34s} " + " ".join(f"{k}={v:.4f}" for k, v in per.items())
              + f" all={overall:.4f} ({seconds:.0f} s)", flush=True)

    measure("base model (no training)", evaluator(loaded.model), 0.0)

    # the federation with plain FedAvg of the site adapters, and with FFA-LoRA at the sites
    # (A fixed, B trained), whose average is exact
    unevaluated = [SiteData(s.name, s.train, []) for s in sites]  # held-out measured once, below
    fsl_rows = {}
    for label, freeze_a in (("FedAvg", False), ("FFA-LoRA at the sites", True)):
        run = settings.model_copy(update={"lora": settings.lora.model_copy(
            update={"site_freeze_a": freeze_a})})
        t = time.perf_counter()
        result = simulate(loaded.model, unevaluated, run, pad)
        cut = result.metadata["cut"]
        name = f"fsl-edge u-shape (cut {cut['a']}/{cut['b']}), {label}"
        measure(name, split_evaluator(loaded.model, run, result.site_adapter,
                                      result.server_adapter), time.perf_counter() - t)
        fsl_rows[label] = (name, rows[-1][2], result)

    t = time.perf_counter()
    union = [e for s in sites for e in s.train]
    central = train_lora(loaded.model, union, settings, site_steps * len(sites), pad)
    measure("centralised LoRA (union of data)", evaluator(central), time.perf_counter() - t)
    del central
    # the same, fed one site's batch at a time in turn, as the federation's trunk sees them:
    # what the sites' non-IID batches cost by themselves
    t = time.perf_counter()
    streams = [BatchStream(s.train, args.batch_size, site_seed(args.seed, s.name), pad) for s in sites]
    in_turn = (next(streams[i % len(streams)]) for i in itertools.count())
    central = train_lora(loaded.model, union, settings, site_steps * len(sites), pad, in_turn)
    measure("centralised LoRA, one site per batch in turn", evaluator(central),
            time.perf_counter() - t)
    del central

    for site in sites:
        t = time.perf_counter()
        alone = train_lora(loaded.model, site.train, settings, site_steps, pad)
        measure(f"{site.name} alone", evaluator(alone), time.perf_counter() - t)
        del alone

    by_name = {r[0]: r[2] for r in rows}
    central_loss = by_name["centralised LoRA (union of data)"]
    best_alone = min(r[2] for r in rows if r[0].endswith(" alone"))
    gaps = "; ".join(f"{name}: **{(loss - central_loss) / central_loss * 100:+.2f} %**"
                     for name, loss, _ in fsl_rows.values())
    fsl = min(loss for _, loss, _ in fsl_rows.values())
    names = [s.name for s in sites]
    table = ["| run | " + " | ".join(names) + " | all chapters | time (s) |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for name, per, overall, seconds in rows:
        table.append(f"| {name} | " + " | ".join(f"{per[n]:.4f}" for n in names)
                     + f" | **{overall:.4f}** | {seconds:.0f} |")
    traffic = sum(sum(r.bytes.values()) for r in fsl_rows['FedAvg'][2].rounds) / 2**20
    body = "\n".join([
        "Held-out loss (mean next-token cross-entropy on the completion, codes no site trained "
        "on), lower is better.",
        "",
        *table,
        "",
        f"- fsl-edge vs centralised (goal: within 2 %): {gaps}. "
        f"Best fsl-edge vs the best site alone: {fsl:.4f} vs {best_alone:.4f} "
        f"({'better' if fsl < best_alone else 'NOT better'}; goal: better).",
        f"- Same work in every trained row: {site_steps} steps per site of batch "
        f"{args.batch_size} x <= {args.max_len} tokens (centralised: {site_steps * len(sites)} "
        f"steps on the union); LoRA r=8 on q/k/v/o of all {discover(loaded.model).n_blocks} blocks, AdamW lr {args.lr}, "
        f"seed {args.seed}; {args.rounds} rounds x {args.steps} local steps, "
        f"{args.per_site} training codes per site.",
        f"- fsl-edge traffic (uncompressed fp32, all hops and adapters): {traffic:.1f} MiB.",
        f"- Machine: {machine()}.",
        f"- Command: `{' '.join(['.venv/bin/python bench/quality.py', *sys.argv[1:]])}`.",
    ])
    print(body)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "quality",
                      "Quality: split federation vs centralised vs sites alone", body)


if __name__ == "__main__":
    main()
