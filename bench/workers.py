"""Split-server workers: step throughput of 8 agents with 1 vs 2 workers (split.server per-site).

Each configuration is a whole federation on this machine: a Mosquitto broker, the real
`fsl-edge coordinator`, N `fsl-edge worker` processes sharing the agents through the broker's
shared subscription, and the agents as `fsl-edge agent` processes on the ICD-10 demo data. The
cut puts most blocks in the trunk (front 1, back 1), so the workers carry most of the compute.
Throughput: agent-steps per second of training rounds (the coordinator's round times; model
loading excluded). The configurations run one after another in the same invocation, alternated
over `--repeats`, and each run's adapters must equal the in-process SplitFed-V1 simulation.

Every process shares this machine's cores: with 8 agents and 2 cores, the agents' own compute
competes with the workers', so the speed-up is bounded by the cores, not by the design. Run it
on a machine with a core per process for the scale-out figure.

    .venv/bin/python bench/workers.py                         # smollm2, 8 agents, 1 vs 2 workers
    .venv/bin/python bench/workers.py --model tiny-random-llama --agents 2 --steps 2 --no-write
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import report  # noqa: E402

from fsl_edge.broker import mosquitto_broker  # noqa: E402
from fsl_edge.cli.federation import prepare  # noqa: E402
from fsl_edge.config import (LearningSettings, LoraSettings, RuntimeSettings,  # noqa: E402
                             ServerCopies, SplitSettings, TrainSettings)
from fsl_edge.coordinator.settings import CoordinatorSettings  # noqa: E402
from fsl_edge.icd10_data import CHAPTERS, build_icd10  # noqa: E402
from tests.integration.runtime_harness import assert_matches_simulation, run_to_end  # noqa: E402


def run(tmp: Path, args, workers: int, data: Path, sites: list[str], tag: str) -> float:
    """Agent-steps per second of one federation with `workers` workers."""
    training = LearningSettings(
        split=SplitSettings(front=args.front, back=args.back, server=ServerCopies.PER_SITE),
        lora=LoraSettings(rank=8),
        train=TrainSettings(rounds=args.rounds, steps=args.steps, batch_size=args.batch_size,
                            max_len=args.max_len, lr=1e-3))
    settings = CoordinatorSettings(model=args.model, training=training, status_port=0,
                                   runtime=RuntimeSettings(run_id="bench-workers", resend_s=60,
                                                           offline_after_s=120))
    with mosquitto_broker(tmp / f"broker-{tag}") as broker:
        fed = prepare(tmp / f"fed-{tag}", settings, sites, data, broker.url, embedded=False)
        fed.workers = workers
        status = run_to_end(fed, timeout=7200)
    if not args.no_simulation:
        assert_matches_simulation(fed)
    steps = sum(args.steps * len(r.participants) for r in status.history)
    seconds = sum(r.seconds for r in status.history)
    print(f"  {workers} worker(s): {steps} agent-steps in {seconds:.1f} s "
          f"({steps / seconds:.3f} /s); copies by worker "
          f"{ {w: s.copies for w, s in status.workers.items()} }", flush=True)
    return steps / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--front", type=int, default=1)
    p.add_argument("--back", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-simulation", action="store_true", help="skip the equality check")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    sites = [c.slug for c in CHAPTERS][:args.agents]
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_icd10(data, chapters=sites, per_site=64, heldout=4)
        for r in range(args.repeats):
            for w in args.workers:
                rates[w].append(run(Path(tmp), args, w, data, sites, f"{w}-{r}"))
    base = statistics.median(rates[args.workers[0]])
    lines = [f"{args.agents} agents, {args.model}, cut front {args.front} / back {args.back} "
             f"(the trunk on the workers), {args.rounds} round(s) x {args.steps} steps of batch "
             f"{args.batch_size} x {args.max_len} tokens; split.server per-site; every run equal "
             f"to the SplitFed-V1 simulation" + (" (not checked)" if args.no_simulation else "") + ".",
             "", "| workers | agent-steps / s (median) | vs 1 worker |", "|---|---|---|"]
    for w in args.workers:
        rate = statistics.median(rates[w])
        lines.append(f"| {w} | {rate:.3f} | {rate / base:.2f}x |")
    lines += ["", "- Every process (broker, coordinator, workers, agents) shares this machine's "
              "cores; the agents' compute competes with the workers'."]
    report("workers", "Split-server workers: 1 vs 2 for 8 agents", lines, "workers.py",
           not args.no_write)


if __name__ == "__main__":
    main()
