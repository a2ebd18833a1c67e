"""`fsl-edge export`: a federation's result as a peft adapter, a merged model and ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape


def export(
    checkpoint: Annotated[Path, typer.Argument(help="A coordinator's checkpoint folder (its LATEST round is used), one of its round-NNNNNN folders, or a `fsl-edge simulate` run folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to create. With one format it is that artefact; with all, it holds peft/, merged/ and onnx/.")],
    format: Annotated[str, typer.Option("--format", help="peft (adapter for PeftModel.from_pretrained), merged (Hugging Face folder), onnx (input_ids, attention_mask -> logits), or all.")] = "all",
    force: Annotated[bool, typer.Option(help="Replace --out if it is not empty.")] = False,
    model: Annotated[Optional[str], typer.Option(help="Base model to export on, when the one the checkpoint names is elsewhere on this machine.")] = None,
) -> None:
    """Export the fine-tuned model in standard formats, each checked against the federation's own forward."""
    from fsl_edge.export import export as run_export, parse_formats

    console = Console(soft_wrap=True)
    outcome = run_export(checkpoint, out, parse_formats(format), force, model,
                         on_step=lambda s: console.print(f"{s} ...", highlight=False))
    console.print(f"exported {escape(outcome.result.describe())} (base model "
                  f"{escape(outcome.result.model)}):", highlight=False)
    for fmt, folder in outcome.folders.items():
        console.print(f"  {fmt:<7}[bold]{escape(str(folder))}[/]  max |logit diff| from the split "
                      f"forward {outcome.max_diff[fmt]:.2e} (logits up to {outcome.scale:.1f})",
                      highlight=False)
