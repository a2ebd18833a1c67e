"""Quality protocol: does the split federation learn as well as pooling the data would, better
than each site alone, and at what cost to a site next to Flower's FedAvg-LoRA of the whole model?

SmolLM2-135M (real weights) on the ICD-10-CM demo sites (one chapter each: non-IID). Each seed
builds its own data split and runs every row with the same steps, batch and tokens: centralised
LoRA on the union; fsl-edge u-shape, vanilla, and u-shape with the `balanced` compression; each
site alone; FedAvg-LoRA of the whole model on every site, run with Flower's simulation engine.
Reported as mean ± std over the seeds: held-out loss per chapter and over all, exact match, the
site's compute and peak memory per step (bench/site_cost.py), bytes per round; then the goals,
and a projection of the site costs to Llama-3.2-1B and Llama-3.1-8B (bench/projection.py).

    .venv/bin/python bench/quality.py              # 3 seeds; writes its section of BENCHMARKS.md
    .venv/bin/python bench/quality.py --seeds 0 --rounds 1 --steps 2 --no-write     # smoke run
    .venv/bin/python bench/quality.py --resume     # a cut-off run: keeps the rows it finished
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import quality_rows as rows  # noqa: E402
from common import write_section  # noqa: E402
from quality_notes import section  # noqa: E402
from quality_report import RowSummary  # noqa: E402
from site_cost import measure  # noqa: E402

from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings,  # noqa: E402
                             SplitMode, SplitSettings, TrainSettings)
from fsl_edge.data import pad_id_of  # noqa: E402
from fsl_edge.delay import ModelSpec  # noqa: E402
from fsl_edge.icd10_data import build_icd10  # noqa: E402
from fsl_edge.models import load  # noqa: E402
from fsl_edge.quality import heldout_samples  # noqa: E402
from fsl_edge.sites import load_sites  # noqa: E402

LOG = "quality-runs.jsonl"  # one line of options and site costs, then one line per seed and row
ROWS = ("central", "u-shape", "vanilla", "balanced", "alone", "flower")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=4, help="rounds (every federated row)")
    ap.add_argument("--steps", type=int, default=8, help="local steps per site and round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--per-site", type=int, default=400, help="training codes per site")
    ap.add_argument("--heldout", type=int, default=64, help="held-out codes per chapter (loss)")
    ap.add_argument("--exact-match", type=int, default=32,
                    help="held-out codes per chapter scored by exact match (the first of them)")
    ap.add_argument("--site-ffa", action="store_true",
                    help="fsl-edge rows: FFA-LoRA at the sites (A fixed, B trained)")
    ap.add_argument("--server-lr", type=float, default=1.0,
                    help="fsl-edge rows: server learning rate of the site-adapter FedAvg")
    ap.add_argument("--front", type=int, default=None, help="fsl-edge cut a (default: 2)")
    ap.add_argument("--back", type=int, default=None,
                    help="fsl-edge u-shape: blocks after the trunk (default: 1)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                    help="rows to run (the base model is always scored); BENCHMARKS.md is "
                         "written only when all run, over 3 seeds or more")
    ap.add_argument("--cost-steps", type=int, default=5, help="measured steps per site cost probe")
    ap.add_argument("--cost-device", default="cpu",
                    help="where site costs are measured: cpu | cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (training and probes)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-quality")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    ap.add_argument("--resume", action="store_true",
                    help="keep the site costs and the rows a cut-off run with the same options "
                         "finished (in --log)")
    ap.add_argument("--log", type=Path, default=None,
                    help="the run's log: options and site costs, then one line per seed "
                         "(default WORKDIR/quality-runs.jsonl; small: it can be kept in git to "
                         "resume a long run elsewhere)")
    return ap.parse_args()


def common_settings(args, seed: int) -> LearningSettings:
    """What every trained row shares: LoRA, optimizer, batching, rounds x steps, the seed."""
    return LearningSettings(lora=LoraSettings(rank=8), train=TrainSettings(
        lr=args.lr, batch_size=args.batch_size, max_len=args.max_len, rounds=args.rounds,
        steps=args.steps, seed=seed))


def variants(args, base: LearningSettings) -> dict[str, LearningSettings]:
    """The fsl-edge rows' settings: the federation's options on top of the common ones."""
    lora = base.lora.model_copy(update={"site_freeze_a": args.site_ffa})
    train = base.train.model_copy(update={"server_lr": args.server_lr})
    u = base.model_copy(update={"lora": lora, "train": train,
                                "split": SplitSettings(front=args.front, back=args.back)})
    return {"u-shape": u,
            "vanilla": u.model_copy(update={"split": SplitSettings(mode=SplitMode.VANILLA,
                                                                   front=args.front)}),
            "balanced": u.model_copy(
                update={"compression": CompressionSettings(preset="balanced")})}


def row_name(key: str, settings: LearningSettings, n_blocks: int, site_ffa: bool) -> str:
    cut = settings.split.cut(n_blocks)
    where = f"cut {cut.a}/{cut.b}" if cut.mode is SplitMode.U_SHAPE else f"cut {cut.a}"
    name = {"u-shape": f"fsl-edge u-shape ({where})", "vanilla": f"fsl-edge vanilla ({where})",
            "balanced": f"fsl-edge u-shape ({where}), balanced compression"}[key]
    return name + (", FFA-LoRA at the sites" if site_ffa else "")


def data_for(args, seed: int) -> Path:
    """Seed `seed`'s own split of the ICD-10 codes into site and held-out files."""
    data_dir = args.workdir / f"data-seed{seed}"
    build_icd10(data_dir, per_site=args.per_site, heldout=args.heldout, seed=seed)
    return data_dir


def run_seed(args, loaded, seed: int, summaries: dict[str, RowSummary],
             kept: dict[str, rows.RowRun]) -> None:
    """Every chosen row on seed `seed`'s own data split; adds the results to `summaries`.
    `kept`: the rows a cut-off run finished for this seed (not run again). Each row goes into
    the log as soon as it is done."""
    data_dir = data_for(args, seed)
    pad = pad_id_of(loaded.tokenizer)
    sites = load_sites(data_dir, loaded.tokenizer, args.max_len)
    score = rows.Scorer(loaded.tokenizer, sites, heldout_samples(data_dir, None, args.exact_match),
                        args.batch_size, pad)
    base = common_settings(args, seed)
    fsl = variants(args, base)
    n_blocks = ModelSpec.from_model(loaded.model).n_blocks
    model, spec = loaded.model, args.model
    print(f"seed {seed}:" + (f" (kept: {', '.join(kept)})" if kept else ""), flush=True)
    runs: dict[str, rows.RowRun] = {}

    def row(key: str, make) -> None:
        runs[key] = kept[key] if key in kept else make()
        if key not in kept:
            with open(log_path(args), "a") as log:
                log.write(json.dumps({"seed": seed, "key": key, "run": asdict(runs[key])}) + "\n")

    row("base", lambda: score("base model (no training)", model, 0.0))
    if "central" in args.rows:
        row("central", lambda: rows.centralised(model, sites, base, pad, score))
    for key in ("u-shape", "vanilla", "balanced"):
        if key in args.rows:
            row(key, lambda key=key: rows.fsl_edge(model, spec, sites, fsl[key], pad, score,
                                                   row_name(key, fsl[key], n_blocks, args.site_ffa)))
    if "alone" in args.rows:
        for site in sites:
            row(f"alone:{site.name}", lambda site=site: rows.alone(model, site, base, pad, score))
    if "flower" in args.rows:
        row("flower", lambda: rows.flower(model, spec, data_dir, sites, base, args.threads, score))
    add_runs(summaries, runs)


def add_runs(summaries: dict[str, RowSummary], runs: dict[str, rows.RowRun]) -> None:
    """Add one seed's rows to the summaries (a row's seeds in seed order)."""
    for key, run in runs.items():
        summaries.setdefault(key, RowSummary(run.name)).add(run.per, run.overall, run.exact,
                                                            run.seconds, run.by_kind)


def log_path(args) -> Path:
    return args.log or args.workdir / LOG


def options(args) -> dict:
    """What must match for a resumed run to continue a cut-off one (the seeds may grow)."""
    skip = {"seeds", "resume", "no_write", "workdir", "log"}
    return {k: (sorted(v) if isinstance(v, list) else v) for k, v in vars(args).items()
            if k not in skip}


def start_log(args, loaded) -> tuple[dict[str, tuple[float, int]], dict[int, dict[str, rows.RowRun]]]:
    """The site costs and the rows done per seed: resumed from the log, or new."""
    path = log_path(args)
    if args.resume and path.exists():
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines or lines[0].get("options") != options(args):
            raise SystemExit(f"--resume: {path} was written with other options; run without "
                             f"--resume to start over")
        done: dict[int, dict[str, rows.RowRun]] = {}
        for line in lines[1:]:
            done.setdefault(line["seed"], {})[line["key"]] = rows.RowRun(**line["run"])
        print(f"resumed from {path}: " + "; ".join(f"seed {s}: {len(r)} rows"
                                                   for s, r in sorted(done.items())), flush=True)
        return {k: tuple(v) for k, v in lines[0]["costs"].items()}, done
    costs = site_costs(args, loaded)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"options": options(args), "costs": costs}) + "\n")
    tmp.replace(path)
    return costs, {}


def site_costs(args, loaded) -> dict[str, tuple[float, int]]:
    """(s per step, peak bytes) of a site's step, on the first seed's first site: the whole
    model, and each fsl-edge row's part. Measured first: a probe that fails, fails early."""
    data_dir = data_for(args, args.seeds[0])
    site = load_sites(data_dir, loaded.tokenizer, args.max_len)[0].name
    base = common_settings(args, args.seeds[0])
    kinds = {"whole": ("whole", base)}
    kinds.update({k: ("site", s) for k, s in variants(args, base).items() if k in args.rows})
    costs = {}
    print(f"site costs (seed {args.seeds[0]}, {site}):", flush=True)
    for key, (kind, settings) in kinds.items():
        c = measure(kind, args.model, settings.model_dump_json(), data_dir, site, args.cost_steps,
                    args.threads, args.cost_device)
        costs[key] = (c.seconds, c.peak_bytes)
        print(f"  {key}: {c.seconds:.3f} s / step, peak {c.peak_bytes / 2**20:.0f} MiB", flush=True)
    return costs


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    if "flower" in args.rows:
        from flower_baseline import require_flower
        require_flower()
    args.workdir.mkdir(parents=True, exist_ok=True)
    loaded = load(args.model)
    costs, done = start_log(args, loaded)
    summaries: dict[str, RowSummary] = {}
    for seed in args.seeds:
        run_seed(args, loaded, seed, summaries, done.get(seed, {}))
    for key, s in summaries.items():
        kind = "whole" if key == "flower" or key.startswith("alone:") else key
        s.cost = None if key in ("base", "central") else costs.get(kind)
    u = variants(args, common_settings(args, args.seeds[0]))["u-shape"]
    text = "\n".join(section(args, ModelSpec.from_model(loaded.model), u, summaries, costs))
    print(text)
    if args.no_write:
        return
    if set(args.rows) != set(ROWS) or len(args.seeds) < 3:
        print("BENCHMARKS.md left alone: only a full run (every row, 3 seeds or more) writes it")
        return
    write_section(ROOT / "BENCHMARKS.md", "quality",
                  "Quality: fsl-edge vs centralised, sites alone and Flower FedAvg-LoRA", text)


if __name__ == "__main__":
    main()
