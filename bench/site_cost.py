"""What one site spends on a training step: compute seconds and peak memory, measured alike for
every row, each in a fresh process that holds only what that site holds.

- `whole`: the whole model with LoRA on every block (a site alone, a Flower client);
- `site`: an fsl-edge site's part (front blocks, and in u-shape the back blocks, head and loss),
  with the codec work a site does: it encodes what it sends and decodes what it receives. The
  server's replies are stand-ins of the right shape (the trunk's output: the site's own front
  activations; the gradient: small noise), made outside the timed spans: a site's compute does
  not depend on their values.

Memory: on CUDA, `torch.cuda.max_memory_allocated` over the measured steps (weights included).
On a CPU, the process's peak resident set over the measured steps (the kernel's VmHWM, reset via
/proc/self/clear_refs after a warm-up step) minus its resident set once the libraries are
imported, before the model is loaded: the site's weights, LoRA, AdamW state, activations, and
whatever the allocator keeps around.
Time: the median of the measured steps after the warm-up; CPU seconds of the process on a CPU
(with one torch thread, its compute time, whatever else the machine runs), wall seconds on
CUDA (synchronised).

    python bench/site_cost.py --probe '{"kind": "whole", ...}'   # what `measure` runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class SiteCost:
    seconds: float  # per step, median
    peak_bytes: int
    steps: int
    device: str


def measure(kind: str, model: str, settings_json: str, data_dir: Path, site: str,
            steps: int = 5, threads: int = 1, device: str = "cpu") -> SiteCost:
    """Run the probe for `kind` ('whole' or 'site') on `site`'s first batches in a subprocess."""
    spec = {"kind": kind, "model": model, "settings": settings_json, "data_dir": str(data_dir),
            "site": site, "steps": steps, "threads": threads, "device": device}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"site cost probe ({kind}) failed:\n{done.stderr[-3000:]}")
    return SiteCost(**json.loads(done.stdout.strip().splitlines()[-1]))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status: peak memory needs Linux")


def _give_back_freed_memory() -> None:
    """Return what the allocator holds but no tensor uses (glibc), so it is not counted."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _site_step(part, codec_stages, batch, timer) -> None:
    """One fsl-edge step as the site runs it; `timer` adds up the site's own spans."""
    import torch

    from fsl_edge.codec import decode_tensor, encode_tensor
    from fsl_edge.config import SplitMode
    from fsl_edge.messages import ActivationDown, GradientDown
    from fsl_edge.protocol import Limits

    def send(message) -> None:  # the site encodes what it sends
        for t in message.tensors().values():
            encode_tensor(t, codec_stages(message.kind, t))

    def receive(message):  # the server encodes (not timed), the site decodes (timed)
        coded = {n: encode_tensor(t, codec_stages(message.kind, t))
                 for n, t in message.tensors().items()}
        with timer:
            return type(message)(**{n: decode_tensor(d, m, Limits.max_tensor_bytes)
                                    for n, (d, m) in coded.items()})

    with timer:
        up = part.forward_front(batch)
        send(up)
    hidden = up.hidden.detach().clone()  # (B, T, C): stands in for the trunk's output
    if part.cut.mode is SplitMode.U_SHAPE:
        down = receive(ActivationDown(hidden))
        with timer:
            grad_up, _ = part.forward_back(down)
            send(grad_up)
    grad = receive(GradientDown(torch.randn_like(hidden) * 1e-4))  # (B, T, C) at cut a
    with timer:
        part.backward_front(grad)
        part.step()


class _Timer:
    """Adds up timed spans. On a CPU it counts the process's CPU seconds, not wall time: the
    machines this runs on are shared, and another process's load must not count as the site's."""

    def __init__(self, sync, cuda: bool):
        import time

        self.clock = time.perf_counter if cuda else time.process_time
        self.sync, self.total = sync, 0.0

    def __enter__(self):
        self.sync()
        self.started = self.clock()

    def __exit__(self, *exc):
        self.sync()
        self.total += self.clock() - self.started


def _import_libraries(model: str) -> None:
    """Import what loading, LoRA and the codecs will import, so the baseline includes the
    libraries' code (a fixed cost of any process) and the peak counts the site's data only."""
    import importlib
    import json as json_

    import peft  # noqa: F401
    import transformers  # noqa: F401
    import zstandard  # noqa: F401

    from fsl_edge.models import resolve

    try:
        import onnxruntime  # noqa: F401  # what a site's prefix backend checks for
    except ImportError:
        pass
    source = resolve(model)
    family = model.removeprefix("tiny-random-") if source.kind == "tiny" else None
    if source.kind == "folder":
        family = json_.loads((source.path / "config.json").read_text()).get("model_type")
    if family:
        try:
            importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            pass


def _probe(spec: dict) -> SiteCost:
    import statistics

    import torch

    from fsl_edge.baselines import lora_model, train_steps
    from fsl_edge.compression import StepCodec
    from fsl_edge.config import LearningSettings
    from fsl_edge.data import BatchStream, pad_id_of
    from fsl_edge.models import load
    from fsl_edge.simulation import site_seed
    from fsl_edge.sites import load_sites
    from fsl_edge.split import discover
    from fsl_edge.step import SitePart, party_options

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    settings = LearningSettings.model_validate_json(spec["settings"])
    train = settings.train
    _import_libraries(spec["model"])
    _give_back_freed_memory()
    before = 0 if cuda else _rss_kib("VmRSS") * 1024
    loaded = load(spec["model"], device=spec["device"])
    site = load_sites(spec["data_dir"], loaded.tokenizer, train.max_len, [spec["site"]])[0]
    stream = BatchStream(site.train, train.batch_size, site_seed(train.seed, site.name),
                         pad_id_of(loaded.tokenizer))
    batches = [next(stream).to(spec["device"]) for _ in range(spec["steps"] + 1)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = _Timer(sync, cuda)
    if spec["kind"] == "whole":
        lm, optimizer = lora_model(loaded.model, settings, copy_model=False)

        def step(batch):
            with timer:
                train_steps(lm, optimizer, iter([batch]), 1)
    else:
        cut = settings.split.cut(discover(loaded.model).n_blocks)
        # the part drops the blocks it does not run: only the site's share stays in memory
        part = SitePart(loaded.model, cut, settings.lora, train.lr, **party_options(settings))
        codec = StepCodec(settings.compression.pipelines())

        def step(batch):
            _site_step(part, codec.stages, batch, timer)
    del loaded
    step(batches[0])  # warm-up: AdamW's state is allocated here, as at every real site
    _give_back_freed_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    times = []
    for batch in batches[1:]:
        timer.total = 0.0
        step(batch)
        times.append(timer.total)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024 - before
    return SiteCost(statistics.median(times), peak, len(times), spec["device"])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--probe":
        raise SystemExit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(asdict(_probe(json.loads(sys.argv[2])))))
