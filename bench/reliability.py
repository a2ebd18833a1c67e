"""Reliability: every fault case of the fault-injection suite, and bad input, on real processes.

Runs the cases of tests/integration/faults.py (agent killed, coordinator SIGKILLed and
restarted, broker restarted, one site cut off by a network partition: short, past
offline_after_s, past the broker's keepalive) and tests/integration/bad_inputs.campaign, each
on a fresh Mosquitto, and writes the "reliability" section of BENCHMARKS.md.

- Final adapters equal the fault-free run's: compared with the in-process simulation with the
  same seeds, which a fault-free distributed run equals bit for bit (test_runtime.py).
- Updates lost: rounds an agent trained to the end and uploaded (its log) that no ledger round
  averaged in, unless the coordinator had already gone on without it (faults.books).
- Bad inputs refused: what the coordinator's status counts, by reason, against what was sent.
The partitions need root (network namespaces); without it they are reported as not run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import report  # noqa: E402

from fsl_edge.broker import mosquitto_broker  # noqa: E402
from fsl_edge.netshape import ShapingUnavailable, shaped_link  # noqa: E402
from tests.integration import bad_inputs, faults  # noqa: E402
from tests.integration.runtime_harness import federation, finish, simulation_gap  # noqa: E402

# What a fault makes the coordinator refuse by design (stale resends, QoS-1 redeliveries)
STALE = ("late", "duplicate")
CASES: dict[str, tuple[str, Callable]] = {
    "agent": ("agent SIGKILLed mid-round, restarted", faults.agent_killed),
    "coordinator": ("coordinator SIGKILLed mid-round, restarted", faults.coordinator_killed),
    "broker": ("broker restarted mid-round (no persistence)", faults.broker_restarted),
    "cut-short": (f"site partitioned {faults.SHORT_CUT_S:g} s mid-round", "short"),
    "cut-offline": ("site partitioned past offline_after_s", "offline"),
    "cut-keepalive": ("site partitioned past the broker's keepalive", "keepalive"),
}


@dataclass
class Row:
    fault: str
    runs: int = 0
    completed: int = 0
    equal: list[bool] = field(default_factory=list)
    why_not: str = ""
    sent: int = 0
    counted: int = 0
    lost: int = 0
    twice: int = 0
    stale: int = 0
    notes: list[str] = field(default_factory=list)


def run_case(key: str, workdir: Path) -> faults.Outcome:
    _, case = CASES[key]
    with contextlib.ExitStack() as stack:
        if isinstance(case, str):  # a partition: the site behind a link, the broker on its address
            link = stack.enter_context(shaped_link(rate_mbit=100, rtt_ms=10, name="fslcut"))
            broker = stack.enter_context(mosquitto_broker(workdir / "broker", host=link.bind_host))
            return faults.partitioned(workdir, broker, link, case)
        return case(workdir, stack.enter_context(mosquitto_broker(workdir / "broker")))


def measure(row: Row, out: faults.Outcome) -> None:
    status, fed = out.status, out.fed
    row.completed += status.state == "finished"
    books = faults.books(fed, status)
    row.sent, row.counted = row.sent + len(books.sent), row.counted + len(books.counted)
    row.lost += len(books.lost | books.unexplained)
    row.twice += len(books.twice)
    row.stale += sum(status.rejected.get(r, 0) for r in STALE)
    if out.not_deterministic:
        row.why_not = out.not_deterministic
    else:
        row.equal.append(simulation_gap(fed) == 0.0)
    everyone = sorted(fed.sites)
    short = [f"round {r.round} without {', '.join(sorted(set(everyone) - set(r.participants)))}"
             for r in status.history if r.participants != everyone]
    if out.cut_s:
        victim = (fed.workdir / "logs" / f"agent-{faults.VICTIM}.log").read_text()
        how = "reconnected" if "reconnected to" in victim else "same connection resumed"
        short.append(f"cut {out.cut_s:.0f} s, {how}")
    row.notes.append("; ".join(short) or "every site in every round")


def bad_input_run(workdir: Path) -> tuple[list[bad_inputs.Bad], dict[str, int], bool]:
    """Sent, the status's refusals by reason from the first sent on, and whether the result
    equals the simulation."""
    with mosquitto_broker(workdir / "broker") as broker:
        fed = federation(workdir, broker.url, rounds=2, steps=30)
        try:
            sent, before = bad_inputs.campaign(fed, broker)
            status = finish(fed)
        finally:
            fed.stop()
    counted = Counter(status.rejected)
    counted.subtract(before)
    return [b for b in sent if b.reason], dict(+counted), simulation_gap(fed) == 0.0


def fault_table(rows: list[Row]) -> list[str]:
    lines = ["| fault injected | runs completed | final adapters = fault-free run's | updates "
             "sent / averaged in | updates lost | counted twice | stale messages refused | what "
             "happened |", "|---|---|---|---:|---:|---:|---:|---|"]
    footnotes: list[str] = []
    for row in rows:
        if row.why_not:
            footnotes.append(row.why_not)
            equal = f"not deterministic ({'†' * (footnotes.index(row.why_not) + 1)})"
        else:
            equal = f"{'yes' if all(row.equal) else 'NO'} ({sum(row.equal)}/{len(row.equal)})"
        lines.append(f"| {row.fault} | {row.completed}/{row.runs} | {equal} | {row.sent} / "
                     f"{row.counted} | {row.lost} | {row.twice} | {row.stale} | "
                     f"{' / '.join(row.notes)} |")
    return lines + [""] + [f"{'†' * (i + 1)} {why}." for i, why in enumerate(dict.fromkeys(footnotes))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=[*CASES, "bad-input"],
                    choices=[*CASES, "bad-input"], help="which to run (all by default)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each fault case")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-reliability")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    rows, skipped = [], []
    for key in (k for k in args.cases if k in CASES):
        row = Row(CASES[key][0])
        for i in range(args.repeat):
            try:
                out = run_case(key, args.workdir / f"{key}-{i}")
            except ShapingUnavailable as e:
                skipped.append(f"{row.fault}: not run, no network namespace ({e})")
                break
            except Exception:  # noqa: BLE001 - a run that fails is a figure, not the end
                traceback.print_exc()
                row.runs += 1
                row.notes.append("failed: see the output")
                continue
            row.runs += 1
            measure(row, out)
            print(f"{row.fault}: {row.notes[-1]}", flush=True)
        if row.runs:
            rows.append(row)
    lines = fault_table(rows) if rows else []
    lines += [f"- {s}." for s in skipped]
    if "bad-input" in args.cases:
        sent, rejected, equal = bad_input_run(args.workdir / "bad-input")
        expected = Counter(b.reason for b in sent)
        refused = sum(n for r, n in rejected.items() if r not in STALE)
        by_reason = ", ".join(f"{r} {rejected.get(r, 0)}/{n}" for r, n in sorted(expected.items()))
        others = {r: n for r, n in rejected.items() if r not in expected}
        lines += [
            f"- Bad inputs: **{len(sent)} tried, {refused} refused** by the coordinator's status "
            f"counters (refused / sent, by reason: {by_reason}"
            + (f"; also counted: {others}" if others else "") + "); the run completed and its "
            f"final adapters {'equal' if equal else 'DIFFER from'} the fault-free run's. Sent "
            "by a client on the broker at a signed run mid-round: "
            + "; ".join(b.what for b in sent) + " (tests/integration/bad_inputs.py)."]
    lines += [
        "- Each fault hits the site `injury` (or the coordinator or broker) at a fixed point of "
        "round 1 or 2 (tests/integration/faults.py); tiny-random-llama, 2-3 sites, u-shape, "
        "heartbeat 0.5 s, offline_after_s 8 s, resend 2 s, MQTT keepalive 15 s. A partition cuts "
        "the site's namespace off both ways (`ShapedLink.partition`: unreachable routes; open "
        "TCP connections keep their state) behind a 100 Mbit/s, 10 ms link.",
        "- Stale messages refused: resends and redeliveries of requests the round no longer "
        "waits for (`late`, `duplicate` in the status): the fault's echo, refused by design."]
    report("reliability", "Reliability: faults injected and bad input", lines, "reliability.py",
           not args.no_write)


if __name__ == "__main__":
    main()
