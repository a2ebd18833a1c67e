"""Frozen prefix backends: torch eager vs ONNX Runtime, per sample, on the same samples.

Both run one unpadded sample at a time (as a site computes its frozen prefix), on the same
token ids, alternating which backend goes first in each repeat so that neither profits from a
warmer cache or a quieter machine. Export and session creation are timed separately: they are
paid once per model and cut, not per sample. ONNX Runtime gets as many threads as torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from common import report  # noqa: E402

from fsl_edge.onnx_prefix import OrtPrefix, TorchPrefix, export_prefix  # noqa: E402


def _pass(prefix, samples: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for ids in samples:
        prefix(ids)
    return time.perf_counter() - start


def compare(model: torch.nn.Module, f: int, samples: list[torch.LongTensor], repeats: int,
            device: str = "auto") -> dict:
    """Time TorchPrefix and OrtPrefix over `samples`, `repeats` alternating passes each.

    Returns seconds per sample (median pass) for each backend, their ratio (torch / ort: above 1
    means ONNX Runtime is faster), the export and session-creation times, the largest output
    difference between the backends, and the ONNX Runtime provider actually used.
    """
    torch_prefix = TorchPrefix(model, f)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_prefix(model, f, Path(tmp) / "prefix.onnx")
        export_s = time.perf_counter() - start
        file_mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        ort_prefix = OrtPrefix(path, device, threads=torch.get_num_threads())
        session_s = time.perf_counter() - start
        diff = max((ort_prefix(ids) - torch_prefix(ids)).abs().max().item() for ids in samples)
        scale = max(torch_prefix(ids).abs().max().item() for ids in samples)
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        backends = [("torch", torch_prefix), ("ort", ort_prefix)]
        for r in range(repeats):
            for name, prefix in backends if r % 2 == 0 else backends[::-1]:
                times[name].append(_pass(prefix, samples) / len(samples))
    torch_s, ort_s = statistics.median(times["torch"]), statistics.median(times["ort"])
    return {"torch_s_per_sample": torch_s, "ort_s_per_sample": ort_s, "ratio": torch_s / ort_s,
            "export_s": export_s, "session_s": session_s, "file_mb": file_mb,
            "max_abs_diff": diff, "output_scale": scale, "provider": ort_prefix.provider,
            "threads": torch.get_num_threads(), "samples": len(samples), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--f", type=int, default=2, help="blocks in the frozen prefix")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", help="ONNX Runtime device: auto, cpu, cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="also write it into BENCHMARKS.md")
    args = ap.parse_args()

    from fsl_edge.models import load

    model = load(args.model).model
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    # the prefix's cost depends on the length, not on which tokens: random ids of ICD-10-like
    # lengths (a code description with its prompt) stand in for real samples
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.samples,), generator=g)
    samples = [torch.randint(0, vocab, (int(n),), generator=g) for n in lengths]
    r = compare(model, args.f, samples, args.repeats, args.device)
    report("prefix_backends", "Frozen prefix: torch eager vs ONNX Runtime", [
        f"- {args.model}, frozen prefix = embedding + {args.f} blocks, {r['samples']} samples of "
        f"{args.min_len}-{args.max_len} tokens, one at a time, median of {r['repeats']} "
        f"alternating passes, {r['threads']} threads each.",
        f"- torch: {r['torch_s_per_sample'] * 1e3:.2f} ms/sample; ONNX Runtime "
        f"({r['provider']}): {r['ort_s_per_sample'] * 1e3:.2f} ms/sample; "
        f"torch/ORT = {r['ratio']:.2f}.",
        f"- Once per model and cut: export {r['export_s']:.1f} s ({r['file_mb']:.0f} MB file), "
        f"session creation {r['session_s']:.2f} s.",
        f"- Largest difference between the backends: {r['max_abs_diff']:.2e} "
        f"(output scale {r['output_scale']:.3g}).",
    ], "prefix_backends.py", args.write)


if __name__ == "__main__":
    main()
