"""Load: 32 agents against one coordinator, 100 steps each, through Mosquitto on loopback.

The coordinator is the real `fsl-edge coordinator` process; the agents are the real agent code
with their own MQTT connections and keys, as threads of this process (why: the docstring of
tests/integration/load_harness.py). Measured: throughput, traffic, the coordinator's resident
memory over the run, and the books: every trunk and site step applied exactly once, every
round's upload counted once in /status and on the ledger (fsl_edge.audit.verify), what the
bounds dropped. Then the same run in-process (fsl_edge.simulation) must give the same adapters.

    .venv/bin/python bench/load.py                     # 32 agents x 10 rounds x 10 steps
    .venv/bin/python bench/load.py --quick --no-write  # 32 agents x 2 x 2, prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import report  # noqa: E402

from fsl_edge.broker import mosquitto_broker  # noqa: E402
from tests.integration.load_harness import account, run_load  # noqa: E402
from tests.integration.runtime_harness import assert_matches_simulation  # noqa: E402

MiB = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--quick", action="store_true", help="2 rounds x 2 steps")
    p.add_argument("--no-simulation", action="store_true", help="skip the in-process comparison")
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    torch.set_num_threads(1)  # 32 agents share this process: torch threads would only contend

    with tempfile.TemporaryDirectory() as tmp:
        load_before = os.getloadavg()[0]
        with mosquitto_broker(Path(tmp)) as broker:
            run = run_load(Path(tmp), broker.url, args.agents, args.rounds, args.steps,
                           timeout=3600)
        load_after = os.getloadavg()[0]
        books = account(run)
        started = time.monotonic()
        same = "not checked"
        if not args.no_simulation:
            assert_matches_simulation(run.fed)  # raises if not
            same = f"yes, bit for bit (simulated in {time.monotonic() - started:.0f} s)"

    status, n = run.status, args.agents
    steps = n * args.rounds * args.steps
    train_s = run.ended - run.trained_from
    messages = sum(t.messages for t in status.traffic.values())
    wire = sum(t.bytes for t in status.traffic.values())
    rss = run.training_rss()
    tenths = [max((b for t, b in run.rss if run.trained_from + k * train_s / 10 <= t
                   <= run.trained_from + (k + 1) * train_s / 10), default=0) for k in range(10)]
    quarters = run.quarters()
    rejected = ", ".join(f"{r} {c}" for r, c in sorted(status.rejected.items())) or "none"
    lines = [
        "| agents | steps each | agent-steps | wall time | training time | agent-steps / s "
        "| messages | bytes on the wire | coordinator peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {n} | {args.rounds * args.steps} ({args.rounds} rounds x {args.steps}) | {steps} "
        f"| {run.ended - run.started:.0f} s | {train_s:.0f} s | {steps / train_s:.1f} "
        f"| {messages:,} | {wire / MiB:.1f} MiB | {max(b for _, b in run.rss) / MiB:.0f} MiB |",
        "",
        f"- Coordinator RSS, peak in each tenth of the training time (MiB): "
        f"{', '.join(f'{b / MiB:.0f}' for b in tenths)}; last quarter / first quarter "
        f"{quarters[3] / quarters[0]:.3f} (the test's bound: 1.25); {len(rss)} samples.",
        f"- Updates lost: **{books.lost}**, applied twice: **{books.duplicated}** (trunk and "
        f"site optimizer steps, round uploads in /status and on the ledger; ledger verified); "
        f"{books.upload_sends} upload sends for {n * args.rounds} uploads; step replies received "
        f"again (answers to resends, not applied): {books.answered_again}.",
        f"- Dropped by reason (/status): {rejected}. (`unknown_agent`: heartbeats an agent sends "
        f"before its HELLO is answered; the bounds' reasons, overflow, evicted, queue_full and "
        f"overload, should not appear in a run of well-behaved agents.)",
        f"- Final adapters equal the in-process simulation of the same 32 sites: {same}.",
        "- Tiny model `tiny-random-llama` (u-shape, LoRA r=4, batch 4 x <= 32 tokens, "
        "`lossless`), messages signed (HMAC from sites, Ed25519 from the coordinator); the "
        "coordinator a process, the agents threads of one process, Mosquitto on loopback. "
        "The split server serves steps in a fixed order (step-major, agents by id), so "
        "agent-steps / s measures the coordinator's round trip per step, not parallel compute.",
        f"- The machine's 1-minute load average before / after the run: {load_before:.1f} / "
        f"{load_after:.1f} on {os.cpu_count()} cores (above 2, other jobs shared the cores).",
    ]
    if books.problems:
        lines.append(f"- PROBLEMS: {'; '.join(books.problems[:10])}")
    report("load", f"Load: {n} agents against one coordinator", lines, "load.py", not args.no_write)
    if books.problems or books.lost or books.duplicated:
        sys.exit(1)


if __name__ == "__main__":
    main()
