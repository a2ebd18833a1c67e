"""Activation cache and layer selection: what they save per epoch on SmolLM2 with ICD-10 sites.

One run, three parts, on the same data and seeds:
1. the frozen prefix (the site's front blocks, no LoRA) without a cache, with the on-disk cache,
   and with the cache plus keys instead of activations: per epoch, the sites' front compute
   time, uplink bytes and cache hit rate; the three runs must end with identical adapters;
2. layer selection policies at the same budget (LoRA everywhere, as in the report): time per
   step, peak memory (each policy in its own process, peak RSS of training alone) and held-out
   loss;
3. the frozen prefix forward with ONNX Runtime vs eager torch.
A round is one epoch of every site (steps = batches per epoch), so the simulation's per-round
figures are per-epoch figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import report  # noqa: E402

from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings,  # noqa: E402
                             PrefixSettings, SelectionSettings, SplitSettings, TrainSettings)
from fsl_edge.data import pad_id_of  # noqa: E402
from fsl_edge.evaluate import split_evaluator  # noqa: E402
from fsl_edge.icd10_data import DEFAULT_CHAPTERS, build_icd10  # noqa: E402
from fsl_edge.messages import ACTIVATION_UP, ADAPTER_UP, GRADIENT_UP  # noqa: E402
from fsl_edge.models import load  # noqa: E402
from fsl_edge.simulation import SiteData, eval_batches, heldout_losses, simulate  # noqa: E402
from fsl_edge.sites import load_sites  # noqa: E402

UPLINK = (ACTIVATION_UP, GRADIENT_UP, ADAPTER_UP)
POLICIES = ("all", "topk-gradnorm", "random", "freeze-front")


def setup(args):
    data_dir = args.workdir / "data"
    build_icd10(data_dir, chapters=DEFAULT_CHAPTERS[:args.sites], per_site=args.per_site,
                heldout=args.heldout, seed=args.seed)
    loaded = load(args.model)
    sites = load_sites(data_dir, loaded.tokenizer, args.max_len)
    steps = min(math.ceil(len(s.train) / args.batch_size) for s in sites)  # one epoch a round
    base = LearningSettings(
        split=SplitSettings(), lora=LoraSettings(rank=8),
        compression=CompressionSettings(preset="none"),  # bytes = what the tensors weigh
        train=TrainSettings(lr=1e-3, batch_size=args.batch_size, max_len=args.max_len,
                            rounds=args.epochs, steps=steps, seed=args.seed))
    return loaded, sites, base


def cache_part(args, loaded, sites, base) -> tuple[list[str], list[str]]:
    pad = pad_id_of(loaded.tokenizer)
    cut = base.split.cut(loaded.model.config.num_hidden_layers)
    a = cut.a
    vanilla = SplitSettings(mode="vanilla")
    # name: (split, frozen prefix, cache, keys, the no-cache run it is compared with)
    runs = {"front trains, batched (reference)": (base.split, 0, False, False, None),
            "no cache": (base.split, a, False, False, None),
            "cache": (base.split, a, True, False, "no cache"),
            "cache + keys": (base.split, a, True, True, "no cache"),
            "vanilla, sites frozen: no cache": (vanilla, a, False, False, None),
            "vanilla, sites frozen: cache + keys": (vanilla, a, True, True,
                                                    "vanilla, sites frozen: no cache")}
    unevaluated = [SiteData(s.name, s.train, []) for s in sites]
    results = {}
    for name, (split, frozen, cached, keys, _) in runs.items():
        settings = base.model_copy(update={"split": split, "prefix": PrefixSettings(
            frozen=frozen, send_keys=keys)})
        folder = args.workdir / "cache" / "".join(c for c in name if c.isalnum())
        shutil.rmtree(folder, ignore_errors=True)
        results[name] = simulate(loaded.model, unevaluated, settings, pad,
                                 cache_dir=folder if cached else None)
        print(f"{name}: " + ", ".join(f"{r.front_seconds:.1f}s/{sum(r.bytes[k] for k in UPLINK) / 2**20:.2f}MiB"
                                      for r in results[name].rounds[1:]), flush=True)
    same = all(adapters_equal(results[name], results[ref]) for name, (*_, ref) in runs.items() if ref)
    table = ["| run | epoch | site front s | uplink MiB | vs no cache | activation up MiB "
             "| vs no cache | cache hit rate |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    totals = {}
    for name, result in results.items():
        up_total = act_total = 0
        ref = results[runs[name][4] or name]
        for e, (r, r0) in enumerate(zip(result.rounds[1:], ref.rounds[1:]), start=1):
            up, up0 = sum(r.bytes[k] for k in UPLINK), sum(r0.bytes[k] for k in UPLINK)
            act, act0 = r.bytes[ACTIVATION_UP], r0.bytes[ACTIVATION_UP]
            up_total, act_total = up_total + up, act_total + act
            looked = r.cache.get("hits", 0) + r.cache.get("misses", 0)
            hit = f"{r.cache['hits'] / looked * 100:.0f} %" if looked else "-"
            table.append(f"| {name} | {e} | {r.front_seconds:.2f} | {up / 2**20:.2f} | "
                         f"{up / up0 * 100:.0f} % | {act / 2**20:.2f} | {act / act0 * 100:.0f} % | {hit} |")
        totals[name] = (up_total, act_total)
    E = args.epochs
    share = lambda run, ref, i: totals[run][i] / totals[ref][i] * 100  # noqa: E731
    hits = [r.cache["hits"] / max(1, r.cache["hits"] + r.cache["misses"])
            for r in results["cache"].rounds[2:]]
    fronts = [r.front_seconds for r in results["cache"].rounds[2:]]
    notes = [
        f"From epoch 2, cache hit rate at least {min(hits) * 100:.0f} % (goal >= 95 %), the sites' "
        f"prefix compute {max(fronts):.2f} s an epoch at most, against "
        f"{results['no cache'].rounds[1].front_seconds:.2f} s uncached (goal ~0).",
        f"Over {E} epochs with keys, u-shape: activation uplink "
        f"{share('cache + keys', 'no cache', 1):.1f} % of no cache (goal <= 1/E + 5 % = "
        f"{100 / E + 5:.0f} %), all uplink {share('cache + keys', 'no cache', 0):.1f} %: the "
        f"gradient at the back cut goes up every step, and no cache can stand for it. Vanilla with "
        f"every site block frozen (the report's design): all uplink "
        f"{share('vanilla, sites frozen: cache + keys', 'vanilla, sites frozen: no cache', 0):.1f} %.",
        f"Each cached run ends with {'bit-identical' if same else 'DIFFERENT'} site and trunk "
        f"adapters to its no-cache run.",
        f"Frozen prefix = the cut a = {a} blocks (embeddings + blocks 0..{a - 1}), computed one "
        f"sample at a time (unpadded, so a cached output equals a recomputed one) with the "
        f"`auto` backend (ONNX Runtime on this CPU, exported before training); in u-shape the "
        f"sites train LoRA on their back block only, the trunk on its {cut.b - a} blocks. The "
        f"reference row is the usual batched front with LoRA on every site block.",
    ]
    return table, notes


def adapters_equal(x, y) -> bool:
    return all(torch.equal(x.site_adapter[k], y.site_adapter[k]) for k in y.site_adapter) and \
        all(torch.equal(x.server_adapter[k], y.server_adapter[k]) for k in y.server_adapter)


def child(args) -> None:
    """One policy in this process: peak memory counts training only (reset after loading)."""
    loaded, sites, base = setup(args)
    pad = pad_id_of(loaded.tokenizer)
    settings = base.model_copy(update={"selection": SelectionSettings(
        policy=args.child, fraction=args.fraction, threshold=args.threshold)})
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
    cpu = time.process_time()
    result = simulate(loaded.model, [SiteData(s.name, s.train, []) for s in sites], settings, pad)
    cpu = time.process_time() - cpu
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM")) * 1024
    heldout = {s.name: eval_batches(s.heldout, args.batch_size, pad) for s in sites}
    _, loss = heldout_losses(split_evaluator(loaded.model, settings, result.site_adapter,
                                             result.server_adapter), heldout)
    rounds = result.rounds[1:]
    steps = sum(settings.train.steps * len(sites) for _ in rounds)
    layers = {party: len(blocks) for party, blocks in rounds[-1].layers.items()}
    print("RESULT " + json.dumps({
        "cpu_step_s": cpu / steps, "step_s": sum(r.seconds for r in rounds) / steps,
        "later_step_s": sum(r.seconds for r in rounds[1:]) / max(1, steps - steps // len(rounds)),
        "peak": hwm, "loss": loss, "layers": layers}), flush=True)


def policies_part(args) -> tuple[list[str], list[str]]:
    # each policy in its own process, `repeats` times in alternating order; the fastest of a
    # policy's runs counts (the others were slowed by whatever else the machine did)
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for r in range(args.repeats):
        for policy in POLICIES if r % 2 == 0 else POLICIES[::-1]:
            argv = [sys.executable, __file__, "--child", policy, *child_args(args)]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            runs[policy].append(json.loads(next(line for line in out.splitlines()
                                                if line.startswith("RESULT "))[7:]))
            print(policy, runs[policy][-1], flush=True)
    results = {p: {k: min(x[k] for x in rs) if k in ("cpu_step_s", "step_s", "later_step_s", "peak")
                   else rs[0][k] for k in rs[0]} for p, rs in runs.items()}
    same = all(len({x["loss"] for x in rs}) == 1 for rs in runs.values())
    ref = results["all"]
    vs = lambda r, k: f"{(r[k] / ref[k] - 1) * 100:+.1f} %"  # noqa: E731
    table = ["| policy | s / step | vs all | s / step, epochs 2+ | vs all | CPU s / step | vs all "
             "| peak RSS (training) | held-out loss | vs all | trainable blocks at the end |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for policy, r in results.items():
        table.append(
            f"| {policy} | {r['step_s']:.2f} | {vs(r, 'step_s')} | {r['later_step_s']:.2f} "
            f"| {vs(r, 'later_step_s')} | {r['cpu_step_s']:.2f} | {vs(r, 'cpu_step_s')} "
            f"| {r['peak'] / 2**30:.2f} GiB | {r['loss']:.4f} | {(r['loss'] / ref['loss'] - 1) * 100:+.2f} % "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(r['layers'].items()))} |")
    t, rnd = results["topk-gradnorm"], results["random"]
    notes = [
        f"`topk-gradnorm` vs `all`: {(1 - t['later_step_s'] / ref['later_step_s']) * 100:.1f} % less "
        f"time per step from epoch 2 (goal >= 10 %), held-out {(t['loss'] / ref['loss'] - 1) * 100:+.2f} % "
        f"(goal within 1 %); vs `random` at the same budget: {t['loss']:.4f} vs {rnd['loss']:.4f}.",
        f"Budget: {args.fraction:.0%} of each party's LoRA blocks (at least one); freeze-front "
        f"threshold {args.threshold}. Selection is re-made at every epoch; epoch 1 trains all. "
        f"Each policy ran {args.repeats} times in its own process, in alternating order; times are "
        f"the fastest run's (wall, and CPU time of the process), the losses were {'the same each time' if same else 'NOT the same each time (the first is shown)'}.",
    ]
    return table, notes


def onnx_part(args, loaded) -> tuple[list[str], list[str]]:
    from prefix_backends import compare

    from fsl_edge.data import tokenize, load_samples

    data = load_samples(args.workdir / "data" / f"site-{DEFAULT_CHAPTERS[0]}.jsonl")
    samples = [torch.tensor(e.input_ids) for e in tokenize(data, loaded.tokenizer, args.max_len)[:32]]
    r = compare(loaded.model, 2, samples, repeats=5)
    return [f"- Frozen prefix (embeddings + 2 blocks), 32 samples one at a time: eager torch "
            f"{r['torch_s_per_sample'] * 1e3:.1f} ms / sample, ONNX Runtime ({r['provider']}) "
            f"{r['ort_s_per_sample'] * 1e3:.1f} ms / sample: **{r['ratio']:.2f}x** faster "
            f"(median of {r['repeats']} alternating passes); export {r['export_s']:.1f} s and "
            f"{r['file_mb']:.0f} MB once per prefix; largest difference {r['max_abs_diff']:.2g} "
            f"at output scale {r['output_scale']:.0f}."
            + ("" if torch.cuda.is_available() else " No GPU on this machine: the CUDA figure "
               "is not measured.")], []


def child_args(args) -> list[str]:
    return ["--model", args.model, "--epochs", str(args.epochs), "--per-site", str(args.per_site),
            "--batch-size", str(args.batch_size), "--max-len", str(args.max_len), "--heldout",
            str(args.heldout), "--sites", str(args.sites), "--seed", str(args.seed),
            "--fraction", str(args.fraction), "--threshold", str(args.threshold),
            "--workdir", str(args.workdir)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-site", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each policy")
    ap.add_argument("--only", nargs="*", choices=("cache", "policies", "onnx"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-cache")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    if args.child:
        return child(args)
    loaded, sites, base = setup(args)
    parts = args.only or ("cache", "policies", "onnx")
    cut = base.split.cut(loaded.model.config.num_hidden_layers)
    setting = (f"- {len(sites)} ICD-10 sites x {args.per_site} codes, {args.epochs} epochs of "
               f"{base.train.steps} steps per site, batch {args.batch_size} x <= {args.max_len} "
               f"tokens, u-shape cut {cut.a}/{cut.b}, LoRA r=8, AdamW 1e-3, seed {args.seed}, fp32 "
               f"on the wire; held-out loss over {args.heldout} unseen codes per chapter.")
    sections = {"cache": ("Activation cache (frozen prefix)", lambda: cache_part(args, loaded, sites, base)),
                "policies": ("Layer selection at equal budget", lambda: policies_part(args)),
                "onnx": ("Frozen prefix: ONNX Runtime vs torch", lambda: onnx_part(args, loaded))}
    for key in parts:  # a section each, so one can be measured again alone
        title, run = sections[key]
        started = time.perf_counter()
        table, notes = run()
        report(f"cache-{key}", title, [*table, "", *(f"- {n}" for n in notes), setting,
                                       f"- This part: {(time.perf_counter() - started) / 60:.0f} min."],
               "cache.py", not args.no_write)


if __name__ == "__main__":
    main()
