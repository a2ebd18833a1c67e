"""`fsl-edge simulate`: a whole split federation in one process, on the bundled model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings, Policy,
                             PrefixSettings, Preset, SelectionSettings, SplitMode, SplitSettings,
                             TrainSettings)


def simulate(
    model: Annotated[str, typer.Option(help="Bundled name, HF folder, .gguf file or tiny-random-<family>.")] = "smollm2",
    data: Annotated[Optional[Path], typer.Option(help="Folder of site-*.jsonl / heldout-*.jsonl (default: build the ICD-10 demo).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder for metrics and adapters.")] = Path("runs/simulate"),
    sites: Annotated[Optional[str], typer.Option(help="Comma-separated site names (default: all in --data).")] = None,
    mode: Annotated[SplitMode, typer.Option(help="u-shape keeps labels at the site; vanilla sends them.")] = SplitMode.U_SHAPE,
    front: Annotated[Optional[int], typer.Option(help="Blocks at the site before the cut.")] = None,
    back: Annotated[Optional[int], typer.Option(help="u-shape: blocks at the site after the server's part.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    steps: Annotated[int, typer.Option(help="Local steps per site per round.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 8,
    max_len: Annotated[int, typer.Option(help="Tokens per sample.")] = 48,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for everything.")] = 0,
    compression: Annotated[Preset, typer.Option(help="What travels on the wire: none (fp32), lossless, balanced (about 10x fewer bytes), aggressive; see BENCHMARKS.md.")] = Preset.LOSSLESS,
    frozen_prefix: Annotated[int, typer.Option(help="Site blocks from the front without LoRA; their outputs are cached on disk (at most the cut).")] = 0,
    send_keys: Annotated[bool, typer.Option(help="With --frozen-prefix = the cut: send sample keys once the server holds a sample's prefix activation (keeps them on the server).")] = False,
    layers: Annotated[Policy, typer.Option(help="Which LoRA blocks train each epoch: all, topk-gradnorm, freeze-front, random.")] = Policy.ALL,
) -> None:
    """Simulate split federated LoRA training in one process and report held-out loss."""
    from fsl_edge.runs import run_simulation, summary  # torch: only when the command runs

    console = Console()
    settings = LearningSettings(
        split=SplitSettings(mode=mode, front=front, back=back), lora=LoraSettings(rank=rank),
        train=TrainSettings(lr=lr, batch_size=batch_size, max_len=max_len, rounds=rounds,
                            steps=steps, seed=seed),
        compression=CompressionSettings(preset=compression),
        prefix=PrefixSettings(frozen=frozen_prefix, send_keys=send_keys),
        selection=SelectionSettings(policy=layers))
    table = Table("round", "train loss", "held-out loss", "tokens", "MiB sent", "s")

    def on_loaded(loaded, site_data):
        console.print(f"model {loaded.source.describe()}; sites: "
                      + ", ".join(f"{s.name} ({len(s.train)} train, {len(s.heldout)} held-out)"
                                  for s in site_data))

    def on_round(r):
        train = sum(r.train_loss.values()) / len(r.train_loss) if r.train_loss else float("nan")
        console.print(f"round {r.round}: held-out loss {r.heldout_loss_all:.4f}"
                      + (f", train loss {train:.4f}" if r.train_loss else " (before training)"))
        table.add_row(str(r.round), f"{train:.4f}", f"{r.heldout_loss_all:.4f}",
                      str(sum(r.tokens.values())), f"{sum(r.bytes.values()) / 2**20:.1f}",
                      f"{r.seconds:.1f}")

    names = [s.strip() for s in sites.split(",")] if sites else None
    result = run_simulation(model, data, out, settings, names, on_round, on_loaded)
    console.print(table)
    s = summary(result.rounds)
    console.print(f"held-out loss {s['heldout_before']:.4f} -> {s['heldout_after']:.4f} in "
                  f"{s['seconds']:.0f} s; traffic "
                  + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in s["bytes"].items() if v)
                  + f"\nadapters and metrics in [bold]{out}[/]")
