"""Communication: bytes, codec speed and quality of every compression preset and baseline.

All rows in one run, on the same data and seeds: a short federation on SmolLM2 (real weights)
with the ICD-10 sites, simulated in process with every message passed through the real codec
(the runtime equals that simulation bit for bit, see tests/integration/test_runtime.py), so the
bytes are real payload bytes and the held-out loss is what the compressed run reaches. Codec
speed is timed on real cut tensors (the four messages of one step), against plain zstd.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import report  # noqa: E402

from fsl_edge.codec import decode_tensor, encode_tensor  # noqa: E402
from fsl_edge.compression import INT8, LOSSLESS  # noqa: E402
from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings,  # noqa: E402
                             SplitSettings, TrainSettings)
from fsl_edge.data import BatchStream, pad_id_of  # noqa: E402
from fsl_edge.evaluate import split_evaluator  # noqa: E402
from fsl_edge.icd10_data import build_icd10  # noqa: E402
from fsl_edge.messages import ADAPTER_DOWN, ADAPTER_UP  # noqa: E402
from fsl_edge.models import load  # noqa: E402
from fsl_edge.simulation import SiteData, eval_batches, heldout_losses, simulate  # noqa: E402
from fsl_edge.sites import load_sites  # noqa: E402
from fsl_edge.split import discover  # noqa: E402
from fsl_edge.step import ServerPart, SitePart  # noqa: E402

BF16 = ("cast:to=bfloat16", "raw", "shuffle", "zstd")
ROWS: dict[str, CompressionSettings] = {
    "raw fp32 (preset none)": CompressionSettings(preset="none"),
    "lossless (shuffle + zstd)": CompressionSettings(preset="lossless"),
    "bf16 + zstd": CompressionSettings(activations=BF16, gradients=BF16, upload=BF16,
                                       download=BF16),
    "per-block int8 + zstd": CompressionSettings(activations=INT8, gradients=INT8, upload=INT8,
                                                 download=INT8),
    "balanced adapters only (steps lossless)": CompressionSettings(
        preset="balanced", activations=LOSSLESS, gradients=LOSSLESS),
    "balanced": CompressionSettings(preset="balanced"),
    "aggressive": CompressionSettings(preset="aggressive"),
}
STEP_KINDS = ("activation_up", "activation_down", "gradient_up", "gradient_down")


def cut_tensors(loaded, settings: LearningSettings, batch) -> dict[str, torch.Tensor]:
    """The four hidden-state tensors of one u-shape step on real weights."""
    cut = settings.split.cut(discover(loaded.model).n_blocks)
    site = SitePart(copy.deepcopy(loaded.model), cut, settings.lora, 1e-3)
    server = ServerPart(copy.deepcopy(loaded.model), cut, settings.lora, 1e-3)
    up = site.forward_front(batch)
    down = server.forward(0, up)
    grad_up, _ = site.forward_back(down)
    grad_down = server.backward(0, grad_up)
    return {"activation_up": up.hidden, "activation_down": down.hidden,
            "gradient_up": grad_up.grad, "gradient_down": grad_down.grad}


def codec_speed(tensors: dict[str, torch.Tensor], settings: CompressionSettings,
                repeat: int = 5) -> tuple[float, float, float]:
    """(encode MB/s, decode MB/s, seconds per step for all four) of raw fp32 megabytes."""
    pipes = settings.pipelines()
    enc = dec = 0.0
    for _ in range(repeat):
        for kind, t in tensors.items():
            stages = pipes.activations if kind.startswith("activation") else pipes.gradients
            t0 = time.perf_counter()
            data, meta = encode_tensor(t, stages)
            t1 = time.perf_counter()
            decode_tensor(data, meta, 1 << 31)
            enc, dec = enc + t1 - t0, dec + time.perf_counter() - t1
    mb = sum(t.numel() * 4 for t in tensors.values()) * repeat / 1e6
    return mb / enc, mb / dec, (enc + dec) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--per-site", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-comm")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()

    data_dir = args.workdir / "data"
    build_icd10(data_dir, per_site=args.per_site, heldout=args.heldout, seed=args.seed)
    loaded = load(args.model)
    pad = pad_id_of(loaded.tokenizer)
    sites = load_sites(data_dir, loaded.tokenizer, args.max_len)
    base = LearningSettings(
        split=SplitSettings(), lora=LoraSettings(rank=8),
        train=TrainSettings(lr=1e-3, batch_size=args.batch_size, max_len=args.max_len,
                            rounds=args.rounds, steps=args.steps, seed=args.seed))
    heldout = {s.name: eval_batches(s.heldout, args.batch_size, pad) for s in sites}
    unevaluated = [SiteData(s.name, s.train, []) for s in sites]
    tensors = cut_tensors(loaded, base, next(BatchStream(sites[0].train, args.batch_size, 0, pad)))
    plain_enc, plain_dec, _ = codec_speed(tensors, CompressionSettings(
        activations=("raw", "zstd"), gradients=("raw", "zstd")))
    steps = args.rounds * args.steps * len(sites)

    results = {}
    for name, compression in ROWS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        settings = base.model_copy(update={"compression": compression})
        t = time.perf_counter()
        result = simulate(loaded.model, unevaluated, settings, pad)
        seconds = time.perf_counter() - t
        _, loss = heldout_losses(split_evaluator(loaded.model, settings, result.site_adapter,
                                                 result.server_adapter), heldout)
        rounds = result.rounds[1:]
        step_bytes = sum(r.bytes[k] for r in rounds for k in STEP_KINDS) / steps
        round_bytes = sum(sum(r.bytes.values()) for r in rounds) / len(rounds)
        upload = sum(r.bytes[ADAPTER_UP] for r in rounds) / len(rounds)
        download = sum(r.bytes[ADAPTER_DOWN] for r in rounds) / len(rounds)
        enc, dec, codec_s = codec_speed(tensors, compression)
        results[name] = (step_bytes, round_bytes, upload, download, loss, enc, dec, codec_s,
                         seconds / steps)
        print(f"{name:42s} step {step_bytes / 1024:8.1f} KiB round {round_bytes / 2**20:7.2f} MiB "
              f"up {upload / 1024:7.1f} KiB loss {loss:.4f} enc {enc:6.0f} dec {dec:6.0f} MB/s "
              f"({seconds:.0f} s)", flush=True)

    ref_name = "raw fp32 (preset none)"
    if ref_name not in results:
        return
    ref = results[ref_name]
    table = ["| codec | bytes / step | vs fp32 | bytes / round | vs fp32 | adapter upload / round "
             "| vs fp32 | held-out loss | vs uncompressed | encode MB/s | decode MB/s "
             "| codec % of step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (sb, rb, up, _, loss, enc, dec, codec_s, step_s) in results.items():
        table.append(
            f"| {name} | {sb / 1024:.0f} KiB | {ref[0] / sb:.1f}x | {rb / 2**20:.2f} MiB "
            f"| {ref[1] / rb:.1f}x | {up / 1024:.0f} KiB | {ref[2] / up:.1f}x | {loss:.4f} "
            f"| {(loss - ref[4]) / ref[4] * 100:+.2f} % | {enc:.0f} | {dec:.0f} "
            f"| {codec_s / step_s * 100:.1f} % |")
    goals = []
    if "balanced" in results:
        b = results["balanced"]
        goals.append(f"`balanced`: {ref[0] / b[0]:.1f}x fewer bytes per step (goal >= 10x), "
                     f"held-out {(b[4] - ref[4]) / ref[4] * 100:+.2f} % (goal within 1 %), "
                     f"codec {b[7] / b[8] * 100:.1f} % of its step time (goal <= 10 %)")
    adapters = "balanced adapters only (steps lossless)"
    if adapters in results:
        a = results[adapters]
        goals.append(f"adapter uploads {ref[2] / a[2]:.1f}x smaller than dense fp32 (goal >= 10x), "
                     f"held-out {(a[4] - ref[4]) / ref[4] * 100:+.2f} % (goal within 0.5 %)")
    report("comm", "Communication: compression presets vs fp32, bf16 and int8", [
        *table, "",
        *(f"- {g}." for g in goals),
        f"- Plain zstd (raw + zstd) on the same tensors: encode {plain_enc:.0f} MB/s, decode "
        f"{plain_dec:.0f} MB/s (MB of fp32 input per second).",
        f"- Bytes are tensor payloads as encoded (envelope headers, a few hundred bytes per "
        f"message, left out); per step = the four hops of one u-shape step, mean over "
        f"{steps} steps. 'codec % of step' = encode + decode of those four tensors over the "
        f"row's own mean step time (CPU; uncompressed: {ref[8]:.2f} s).",
        f"- Federation: {len(sites)} ICD-10 sites x {args.per_site} codes, {args.rounds} rounds x "
        f"{args.steps} steps, batch {args.batch_size} x <= {args.max_len} tokens, LoRA r=8, "
        f"AdamW 1e-3, seed {args.seed}; held-out loss over {args.heldout} unseen codes per "
        f"chapter; preset pipelines in `fsl_edge/compression.py`.",
    ], "comm.py", not args.no_write)


if __name__ == "__main__":
    main()
