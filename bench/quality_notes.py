"""The quality protocol's section of BENCHMARKS.md: the table, the goals, the projection to
larger models, and how every figure was made."""

from __future__ import annotations

import importlib.metadata
import sys

import projection
from common import machine
from quality_report import RowSummary, bytes_by_kind, cost_goals, loss_goals, table

from fsl_edge.config import LearningSettings
from fsl_edge.delay import ModelSpec
from fsl_edge.exact_match import RULE

FSL_ROWS = ("u-shape", "vanilla", "balanced")


def section(args, spec: ModelSpec, u: LearningSettings, summaries: dict[str, RowSummary],
            costs: dict[str, tuple[float, int]]) -> list[str]:
    chapters = sorted(summaries["base"].per)
    lines = ["Held-out loss (mean next-token cross-entropy on the completion over codes no site "
             "trained on; lower is better) and exact match, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}.", "",
             *table(list(summaries.values()), chapters), ""]
    alone = [s for k, s in summaries.items() if k.startswith("alone:")]
    fsl = [summaries[k] for k in FSL_ROWS if k in summaries]
    if "central" in summaries and alone:
        lines += loss_goals(summaries["central"], fsl, alone)
    if "u-shape" in summaries and "flower" in summaries:
        lines += cost_goals(summaries["u-shape"], summaries["flower"])
    if "u-shape" in costs:
        lines += projection_lines(args.model, spec, u, costs)
    return lines + notes(args, spec, u, summaries, len(chapters))


def projection_lines(model: str, spec: ModelSpec, u: LearningSettings,
                     costs: dict[str, tuple[float, int]]) -> list[str]:
    ref = projection.Sizes(model, spec.n_blocks, spec.hidden, spec.intermediate, spec.vocab,
                           spec.block_params, spec.embed_params + spec.head_params)
    cut = u.split.cut(spec.n_blocks)
    front, back = cut.a, cut.n - cut.b
    seconds = projection.Split(costs["whole"][0], costs["u-shape"][0])
    memory = projection.Split(costs["whole"][1], costs["u-shape"][1])
    out = []
    for config in projection.TARGETS:
        target = projection.llama_sizes(config)
        try:
            p = projection.project(ref, seconds, memory, front + back, target, front + back,
                                   spec.weight_bytes)
        except ValueError as e:
            return [f"- Projection to larger models: not possible from these measurements ({e})."]
        out.append(f"{p.name} ({target.params / 1e9:.2f} B parameters; the site runs {front} + "
                   f"{back} of {target.n_blocks} blocks): site {p.site_s:.2f} s vs whole model "
                   f"{p.whole_s:.2f} s per step = **{p.compute_ratio:.2f}x** (goal <= 0.33); "
                   f"peak memory {p.site_bytes / 2**30:.2f} vs {p.whole_bytes / 2**30:.2f} GiB = "
                   f"**{p.memory_ratio:.2f}x** (goal <= 0.50)")
    return ["- **Projection, not a measurement** (bench/projection.py): the measured whole-model "
            "and u-shape-site costs above, split into a per-block part and a fixed one "
            "(embeddings, head, loss), scaled to each model's shape (from the "
            f"{projection.SOURCE}): compute by the parameters of a block and by vocab x hidden "
            "for the head; memory as the exact weights plus the measured rest scaled by "
            "activation width (per block) and by vocab (logits); fp32, the same batch and "
            "tokens per step. " + "; ".join(out) + "."]


def notes(args, spec: ModelSpec, u: LearningSettings, summaries: dict[str, RowSummary],
          n_sites: int) -> list[str]:
    site_steps = args.rounds * args.steps
    flower = [
        f"- Flower row: flwr {importlib.metadata.version('flwr')}, its simulation engine (Ray); "
        "the ServerApp's FedAvg of the whole model's LoRA weights, weighted by examples; each "
        "site a ClientApp that runs fsl-edge's own LoRA step on the batches it trains on in the "
        "federation and keeps its AdamW state across rounds (bench/flower_baseline.py). Its wall "
        "time includes starting Ray and loading the model in the client process."
    ] if "flower" in summaries else []
    return [
        f"- Same work in every trained row: {site_steps} steps per site ({args.rounds} rounds x "
        f"{args.steps} local steps) of batch {args.batch_size} x <= {args.max_len} tokens "
        f"(centralised: {site_steps * n_sites} steps on the union of the data); LoRA r=8 on "
        f"q/k/v/o of all {spec.n_blocks} blocks, AdamW lr {args.lr}; {args.per_site} training "
        "codes per site. Each seed draws its own split of the codes, adapter initialisation "
        "and batch order.",
        f"- Held-out loss over {args.heldout} held-out codes per chapter; exact match over the "
        f"first {args.exact_match} of them: {RULE}.",
        f"- fsl-edge rows: the engine of `fsl-edge simulate`; compression "
        f"`{u.compression.preset.value}` unless named; FFA-LoRA at the sites: "
        f"{'on' if args.site_ffa else 'off'}; server lr {args.server_lr}.",
        *flower,
        "- Bytes per round and site: fsl-edge, what crosses the wire in a round (the activations "
        "and gradients of every step, the site adapter both ways) after the row's codec; "
        "Flower, the serialised LoRA arrays down and up. By kind, in MiB: "
        + bytes_by_kind(list(summaries.values())) + ".",
        f"- Site compute and peak memory per step (bench/site_cost.py): measured once, on seed "
        f"{args.seeds[0]}'s first site, each in a fresh process that holds only that site's "
        "part (a site alone and a Flower client: the whole model); the median of "
        f"{args.cost_steps} steps after a warm-up, {args.threads} torch thread(s) on "
        f"{args.cost_device} (CPU seconds of the process: other load on the machine does not "
        "count); an fsl-edge site's time includes its codec work; memory: the peak resident "
        "set minus the process's before the model loaded (CUDA: peak allocated). The "
        "centralised row has no site.",
        f"- Machine: {machine()}.",
        f"- Command: `{' '.join(['.venv/bin/python bench/quality.py', *sys.argv[1:]])}`.",
    ]
