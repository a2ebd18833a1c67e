"""Transport benchmark: what carrying the split steps over MQTT costs, measured in one run.

1. Throughput: a 16 MiB float32 tensor (codec stage "raw" only, so compression does not
   confound it) goes from one MqttLink to another through a real broker, in 1 MiB chunks and as
   one message, on Mosquitto and on the embedded amqtt. Timed from the publish call to the
   decoded tensor coming out of get(); the cases alternate so a shared machine's noise hits all.
2. Step time: the same split-LoRA steps (model, data, batch, seeds) as a real federation over
   Mosquitto on loopback (coordinator and agent processes) and in-process (simulation.simulate),
   in-process before and after the federation so drift on the machine shows.

    .venv/bin/python bench/transport.py                      # writes its section of BENCHMARKS.md
    .venv/bin/python bench/transport.py --quick --no-write   # smoke check, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, write_section  # noqa: E402

from fsl_edge import protocol  # noqa: E402
from fsl_edge.broker import amqtt_broker, mosquitto_broker  # noqa: E402
from fsl_edge.chunking import split_message  # noqa: E402
from fsl_edge.cli.federation import prepare  # noqa: E402
from fsl_edge.config import LoraSettings, RuntimeSettings, SplitSettings, TrainSettings  # noqa: E402
from fsl_edge.coordinator.settings import CoordinatorSettings  # noqa: E402
from fsl_edge.data import pad_id_of  # noqa: E402
from fsl_edge.icd10_data import build_icd10  # noqa: E402
from fsl_edge.models import load  # noqa: E402
from fsl_edge.protocol import Envelope, MessageKind  # noqa: E402
from fsl_edge.config import LearningSettings
from fsl_edge.simulation import simulate  # noqa: E402
from fsl_edge.sites import load_sites  # noqa: E402
from fsl_edge.transport import MqttLink  # noqa: E402
from fsl_edge.compression import LOSSLESS as FLOAT_STAGES  # noqa: E402

RUN = "bench-transport"
MIB = 1 << 20
# (label, sender id, max_packet): 1 MiB is EMQX's default limit; 64 MiB lets 16 MiB go whole.
CASES = (("1 MiB chunks", "chunked", MIB), ("one message", "whole", 64 * MIB))
WAIT_S = 60.0


def throughput(workdir: Path, mib: int, reps: int) -> list[dict]:
    """One row per (broker, case): median seconds per message over `reps`, after a warm-up."""
    tensor = torch.randn(mib * MIB // 4, generator=torch.Generator().manual_seed(0))
    rows = []
    for broker_name, make in (("Mosquitto", mosquitto_broker), ("amqtt (embedded)", amqtt_broker)):
        with make(workdir) as broker:
            rows += _cases(broker, broker_name, tensor, reps)
    return rows


def _cases(broker, broker_name: str, tensor: torch.Tensor, reps: int) -> list[dict]:
    rx = MqttLink(broker.url, f"bench-rx-{broker.port}", [protocol.topic_all_up(RUN)])
    tx = {label: MqttLink(broker.url, f"bench-{agent}-{broker.port}", [], max_packet=mp)
          for label, agent, mp in CASES}
    rows = {label: {"broker": broker_name, "case": label, "times": [], "error": ""}
            for label, _, _ in CASES}
    links = [rx, *tx.values()]
    try:
        for link in links:
            link.start()
        for rep in range(reps + 1):  # rep 0: the untimed warm-up, checking the tensor arrives intact
            for label, agent, mp in CASES:
                row = rows[label]
                if row["error"]:
                    continue
                env = Envelope(MessageKind.ACTIVATION_UP, RUN, agent)
                env.add_tensor("x", tensor, ("raw",))
                row["packets"] = len(split_message(protocol.encode_envelope(env), mp))
                t0 = time.perf_counter()
                tx[label].publish(protocol.topic_up(RUN, agent), env)
                got = _wait_for(rx, agent)
                out = got.tensor("x") if got is not None else None  # decoding is part of the trip
                seconds = time.perf_counter() - t0
                if out is None:
                    # a broker that refuses the packet drops the connection and paho resends
                    # forever: stop that sender so it does not load the other case
                    row["error"] = f"nothing arrived within {WAIT_S:.0f} s"
                    tx[label].stop()
                elif rep == 0 and not torch.equal(out, tensor):
                    row["error"] = "tensor arrived corrupted"
                elif rep > 0:
                    row["times"].append(seconds)
                print(f"  {broker_name:17s} {label:13s} rep {rep}: {seconds:.3f} s {row['error']}", flush=True)
    finally:
        for link in links:
            link.stop()
    return list(rows.values())


def _wait_for(rx: MqttLink, agent: str) -> Envelope | None:
    """The next envelope from `agent` (a late one from a failed case is skipped)."""
    deadline = time.monotonic() + WAIT_S
    while (left := deadline - time.monotonic()) > 0:
        got = rx.get(timeout=left)
        if got is not None and got.topic.agent == agent:
            return got.envelope
    return None


def step_time(workdir: Path, model: str, rounds: int, steps: int, batch: int, max_len: int,
              per_site: int) -> dict:
    """Per-step seconds of the same rounds in-process, over Mosquitto, and in-process again."""
    data_dir = workdir / "data"
    # no held-out codes: simulate's round seconds include its held-out evaluation, and the
    # federation's do not, so with nothing to evaluate the two time the same work
    build_icd10(data_dir, chapters=("circulatory",), per_site=per_site, heldout=0, seed=0)
    training = LearningSettings(split=SplitSettings(), lora=LoraSettings(), train=TrainSettings(
        rounds=rounds, steps=steps, batch_size=batch, max_len=max_len, seed=0))
    loaded = load(model)
    sites = load_sites(data_dir, loaded.tokenizer, max_len)
    assert all(not s.heldout for s in sites), "held-out data would be timed in-process only"

    def in_process() -> list[float]:
        result = simulate(loaded.model, sites, training, pad_id_of(loaded.tokenizer))
        return [r.seconds for r in result.rounds[1:]]  # rounds[0] is the before-training eval

    before = in_process()
    mqtt, traffic = _federation(workdir / "mqtt", model, training, [s.name for s in sites],
                                data_dir, rounds * 60.0 + 180.0)
    after = in_process()
    return {"before": before, "mqtt": mqtt, "after": after, "traffic": traffic}


def _federation(workdir: Path, model: str, training: LearningSettings, names: list[str],
                data_dir: Path, timeout: float) -> tuple[list[float], dict]:
    """Round seconds (coordinator's status.json) and traffic of a real run on Mosquitto."""
    workdir.mkdir(parents=True, exist_ok=True)
    with mosquitto_broker(workdir) as broker:
        # resend/offline as `fsl-edge up` sets them: model loading on 2 busy cores is slow
        settings = CoordinatorSettings(model=model, training=training, status_port=0,
                                       runtime=RuntimeSettings(run_id=RUN, resend_s=30.0,
                                                               offline_after_s=60.0))
        fed = prepare(workdir, settings, names, data_dir, broker.url, embedded=False)
        try:
            fed.start()
            deadline = time.monotonic() + timeout
            while not fed.coordinator_done():
                fed.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"federation not finished in {timeout:.0f} s; logs in "
                                       f"{workdir / 'logs'}")
                time.sleep(0.5)
            fed.wait(timeout=30)
            fed.check()
        finally:
            fed.stop()
    status = json.loads((fed.checkpoint_dir / "status.json").read_text())
    return [h["seconds"] for h in status["history"]], status["traffic"]


def per_step(seconds: list[float], steps: int) -> float:
    """Mean seconds per step over the rounds after the first (round 1 is the warm-up)."""
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return sum(timed) / (len(timed) * steps)


def report(rows: list[dict], st: dict, args) -> str:
    table = [f"| broker | {args.mib} MiB fp32 sent as | MQTT packets | median s / message "
             "| range (s) | MiB/s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        med, t = statistics.median(r["times"] or [0]), r["times"] or [0]
        table.append(f"| {r['broker']} | {r['case']} | {r.get('packets', '-')} | " + (
            f"failed: {r['error']} | | |" if r["error"] else
            f"{med:.3f} | {min(t):.3f}-{max(t):.3f} | {args.mib / med:.0f} |"))
    before, after, mqtt = (per_step(st[k], args.steps) for k in ("before", "after", "mqtt"))
    local = (before + after) / 2
    steps_table = ["| run | round seconds | s / step (rounds 2+) |", "|---|---|---:|"]
    for name, key, value in (("in-process (before)", "before", before),
                             ("over Mosquitto, loopback", "mqtt", mqtt),
                             ("in-process (after)", "after", after)):
        steps_table.append(f"| {name} | {', '.join(f'{s:.2f}' for s in st[key])} | {value:.3f} |")
    per_msg = {k: t["bytes"] / t["messages"] / 1024 for k, t in st["traffic"].items()
               if t["messages"] and t["bytes"] >= 1024 * t["messages"]}
    return "\n".join([
        f"**Throughput**: one {args.mib} MiB float32 tensor (codec `raw` only) from one MqttLink "
        f"to another through the broker on loopback, QoS 1, both paho clients in one Python "
        f"process; from the publish call to the decoded tensor out of `get()`; median of "
        f"{args.reps} after a warm-up, the cases alternating.",
        "", *table, "",
        f"**Step time**: `{args.model}`, 1 agent, {args.rounds} rounds x {args.steps} steps, "
        f"batch {args.batch_size} x <= {args.max_len} tokens, u-shape split, same data and seeds, "
        f"{args.threads} torch thread(s) in every process; "
        "in-process (`simulate`) run before and after the federation (coordinator + agent as "
        "processes on Mosquitto). Round 1 is a warm-up and excluded. Round seconds: the "
        "coordinator's (ROUND_START to the last upload, FedAvg included) vs `simulate`'s "
        "(no held-out data, so its per-round evaluation costs nothing).",
        "", *steps_table, "",
        f"- Overhead over MQTT vs the mean in-process step: **{(mqtt - local) / local * 100:+.1f} "
        f"%** ({mqtt - local:+.3f} s / step; goal: <= 10 %). The two in-process runs differ by "
        f"{abs(after - before) / local * 100:.1f} %: the noise floor on this shared machine.",
        f"- Mean KiB per message over MQTT (codec {' + '.join(FLOAT_STAGES)}): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_msg.items())) + ".",
        f"- Machine: {machine()}.",
        f"- Command: `.venv/bin/python {' '.join(['bench/transport.py', *sys.argv[1:]])}`.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--per-site", type=int, default=64)
    ap.add_argument("--mib", type=int, default=16, help="tensor size for the throughput test")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: tiny model, 2 rounds x 2 steps, 4 MiB, 2 repetitions")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    if args.quick:
        args.model, args.rounds, args.steps, args.mib, args.reps = "tiny-random-llama", 2, 2, 4, 2
    # The same thread count in this process and in the coordinator and agent (they inherit the
    # environment): on a small shared machine, oversubscribed torch threads are 2-5x slower
    # and erratic, which would swamp the overhead being measured.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-transport-") as tmp:
        started = time.perf_counter()
        rows = throughput(Path(tmp), args.mib, args.reps)
        st = step_time(Path(tmp), args.model, args.rounds, args.steps, args.batch_size,
                       args.max_len, args.per_site)
        print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    body = report(rows, st, args)
    print(body)
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", "transport",
                      "Transport: MQTT throughput and step time over MQTT vs in-process", body)


if __name__ == "__main__":
    main()
