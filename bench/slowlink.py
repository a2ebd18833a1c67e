"""Slow link: step time of `balanced` vs raw fp32 with the agent behind a 20 Mbit/s, 50 ms link.

The agent runs in its own network namespace; the coordinator and Mosquitto run on the host; the
link between them is shaped (see fsl_edge/netshape.py: netem where the kernel has it, else tbf
plus a delay relay). Every configuration runs in the same session, alternating, on the same link.

Two models, because on this CPU the compute of a step can hide the link:
- SmolLM2-135M (30 blocks): the whole model; on a 2-core CPU a step computes for seconds.
- the same weights cut to their first 4 blocks: the same activations on the wire (576 channels)
  at a fraction of the compute, standing in for a site and server fast enough (GPUs) that the
  link is what a step waits for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import report  # noqa: E402
from slowlink_probe import measure  # noqa: E402

from fsl_edge.broker import mosquitto_broker  # noqa: E402
from fsl_edge.cli.federation import prepare  # noqa: E402
from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings,  # noqa: E402
                             RuntimeSettings, SplitSettings, TrainSettings)
from fsl_edge.coordinator.settings import CoordinatorSettings  # noqa: E402
from fsl_edge.icd10_data import build_icd10  # noqa: E402
from fsl_edge.models import load  # noqa: E402
from fsl_edge.netshape import ShapingUnavailable, shaped_link  # noqa: E402

PRESETS = ("none", "balanced")


def truncated_model(folder: Path, blocks: int) -> Path:
    """SmolLM2's real weights, first `blocks` blocks only, saved as a local HF folder."""
    if (folder / "config.json").exists():
        return folder
    loaded = load("smollm2")
    model = loaded.model
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def run_once(workdir: Path, model: str, preset: str, link, broker, data: Path, args) -> list[float]:
    """One agent behind the link, one round's worth of steps; seconds per step of each round."""
    training = LearningSettings(
        split=SplitSettings(), lora=LoraSettings(rank=8),
        train=TrainSettings(rounds=args.rounds, steps=args.steps, batch_size=args.batch_size,
                            max_len=args.max_len, lr=1e-3),
        compression=CompressionSettings(preset=preset))
    settings = CoordinatorSettings(model=model, training=training, status_port=0,
                                   runtime=RuntimeSettings(run_id=f"slow-{preset}", resend_s=60,
                                                           offline_after_s=120))
    fed = prepare(workdir, settings, ["circulatory"], data, broker.url, embedded=False)
    if link is not None:  # else the agent runs on the host, next to the broker: no shaping
        fed.agent_wrap, fed.agent_broker = link.wrap, link.broker_url(broker.port)
    try:
        fed.start()
        while not fed.coordinator_done():
            fed.check()
            time.sleep(0.5)
        fed.wait(60)
        fed.check()
    finally:
        fed.stop()
    status = fed.final_status()
    return [r.seconds / args.steps for r in status.history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20.0, help="Mbit/s each way")
    ap.add_argument("--rtt", type=float, default=50.0, help="round-trip time, ms")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-slowlink")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    data = args.workdir / "data"
    build_icd10(data, per_site=64, heldout=4)
    models = {"SmolLM2-135M, 30 blocks": "smollm2",
              "SmolLM2 weights, first 4 blocks": str(truncated_model(args.workdir / "smollm2-4", 4))}
    try:
        with shaped_link(rate_mbit=args.rate, rtt_ms=args.rtt) as link, \
                mosquitto_broker(args.workdir / "broker", host=link.bind_host) as broker:
            figures = measure(link)
            print(f"link: {link.describe()}; measured {figures.up_mb_s:.2f} MB/s up, "
                  f"{figures.down_mb_s:.2f} MB/s down, RTT {figures.rtt_ms:.1f} ms", flush=True)
            results: dict[tuple[str, str, bool], list[float]] = {}
            for label, model in models.items():
                for preset in PRESETS:  # alternating, on the same link and broker
                    for shaped in (True, False):  # unshaped: what the step costs without the link
                        per_round = run_once(args.workdir / "run", model, preset,
                                             link if shaped else None, broker, data, args)
                        results[(label, preset, shaped)] = per_round
                        print(f"{label:34s} {preset:9s} {'shaped' if shaped else 'unshaped':8s} "
                              "s/step by round: " + ", ".join(f"{s:.2f}" for s in per_round),
                              flush=True)
    except ShapingUnavailable as e:
        print(f"slow-link benchmark skipped: {e}")
        return

    table = ["| model | compression | s / step, each round | s / step (rounds 2+) "
             "| same, unshaped | the link's share (shaped - unshaped) |",
             "|---|---|---|---:|---:|---:|"]
    ratios = []
    for label in models:
        steady, link_s = {}, {}
        for preset in PRESETS:
            per_round = results[(label, preset, True)]
            steady[preset] = statistics.mean(per_round[1:] or per_round)
            unshaped = results[(label, preset, False)]
            bare = statistics.mean(unshaped[1:] or unshaped)
            link_s[preset] = steady[preset] - bare
            table.append(f"| {label} | {preset} | {', '.join(f'{s:.2f}' for s in per_round)} "
                         f"| {steady[preset]:.2f} | {bare:.2f} | {link_s[preset]:.2f} |")
        ratios.append(f"{label}: `balanced` is **{steady['none'] / steady['balanced']:.1f}x** "
                      f"faster per step than raw fp32; the time the link adds to a step is "
                      f"{link_s['none'] / max(link_s['balanced'], 1e-3):.1f}x shorter")
    report("slowlink", "Slow link: balanced vs raw fp32 over 20 Mbit/s, 50 ms RTT", [
        *table, "",
        f"- {'; '.join(ratios)} (goal >= 3x per step).",
        "- Unshaped: the same run with the agent on the host (loopback to the broker): the step's "
        "compute, which no compression shortens. On this 2-core CPU it bounds the step-time ratio: "
        "(link + compute) / (link / r + compute) stays under 3x whatever r, once compute exceeds "
        "half the uncompressed link time.",
        f"- Link: {link.describe()}; measured {figures.up_mb_s:.2f} MB/s up, "
        f"{figures.down_mb_s:.2f} MB/s down, RTT {figures.rtt_ms:.1f} ms (bench/slowlink_probe.py).",
        f"- One agent in a network namespace, coordinator and Mosquitto on the host; u-shape "
        f"split, batch {args.batch_size} x <= {args.max_len} tokens, {args.rounds} rounds x "
        f"{args.steps} steps; round 1 (warm-up) excluded from the mean. A step's seconds are the "
        f"coordinator's round time (ROUND_START to the upload) over the steps, so they include "
        f"the adapter download and upload. Needs root (network namespaces).",
    ], "slowlink.py", not args.no_write)


if __name__ == "__main__":
    main()
