"""`fsl-edge report`: one self-contained HTML page with the plots of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape


def report(
    run: Annotated[Path, typer.Argument(
        help="The run: a checkpoint folder (runs/up/checkpoints, or the workdir of `fsl-edge "
             "up`) or the --out folder of `fsl-edge simulate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("report.html"),
    public_key: Annotated[Optional[Path], typer.Option(
        exists=True, dir_okay=False,
        help="The coordinator's ledger.pub, kept apart from the run, to verify the ledger with.")] = None,
) -> None:
    """Write an HTML report of a run: loss, traffic, compression, cache, layers, ledger."""
    from fsl_edge.report import write_report  # matplotlib: only when the command runs

    path = write_report(run, out, public_key)
    Console(highlight=False, soft_wrap=True).print(f"report: {escape(str(path))}")
