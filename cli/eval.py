"""`fsl-edge eval`: held-out loss, perplexity and exact match of the base and the fine-tuned model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fsl_edge.errors import ConfigError
from fsl_edge.exact_match import RULE as EXACT_MATCH_RULE


def eval_(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A coordinator's checkpoint folder (its LATEST round; safe to read while the coordinator runs), one of its round-NNNNNN folders, or a `fsl-edge simulate` run folder.")] = None,
    url: Annotated[Optional[str], typer.Option(help="Instead of CHECKPOINT: a running coordinator's status API; its checkpoint folder must be readable from here.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Data folder with heldout-<site>.jsonl files (default: the one a simulate run recorded).")] = None,
    sites: Annotated[Optional[str], typer.Option(help="Comma-separated sites (default: every site with a held-out file).")] = None,
    samples: Annotated[Optional[int], typer.Option(min=1, help="Held-out samples per site, the first ones (default: all).")] = None,
    exact_match: Annotated[bool, typer.Option(help=f"Also score exact match: {EXACT_MATCH_RULE}.")] = True,
    model: Annotated[Optional[str], typer.Option(help="Base model, when the one the checkpoint names is elsewhere on this machine.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
) -> None:
    """Score the base and the fine-tuned model on each site's held-out data and over all of them.

    Loss: next-token cross-entropy over completion tokens, as in training; perplexity: exp(loss).
    """
    from fsl_edge.quality import evaluate_result
    from fsl_edge.result import read_result

    if (checkpoint is None) == (url is None):
        raise ConfigError("name a checkpoint folder or a running coordinator's --url (one of them)")
    if url is not None:
        from .status import fetch

        status, _ = fetch(url)
        if not status.checkpoint:
            raise ConfigError(f"the coordinator at {url} has no checkpoint yet: no round has closed")
        checkpoint = Path(status.checkpoint)
        if not checkpoint.is_dir():
            raise ConfigError(f"the coordinator at {url} keeps its checkpoints in {checkpoint}, "
                              "which is not on this machine: run eval where that folder is mounted")
    err = Console(stderr=True, soft_wrap=True)
    result = read_result(checkpoint)
    names = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    scored = evaluate_result(result, data, names, samples, exact_match, model, device,
                             on_step=lambda s: err.print(f"{s} ...", highlight=False))
    if as_json:
        print(json.dumps(scored.to_json(), indent=1))
        return
    # base and tuned side by side per measure; a compact box so a row fits 80 columns
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left",
                  title=f"{scored.checkpoint}, base model {scored.model}")
    table.add_column("site", no_wrap=True)
    for name in ("samples", "loss\nbase", "loss\ntuned", "ppl\nbase", "ppl\ntuned",
                 *(("EM\nbase", "EM\ntuned") if exact_match else ())):
        table.add_column(name, justify="right")
    for row in [*scored.sites, scored.overall]:
        cells = [row.name, str(row.samples), f"{row.base.loss:.3f}", f"{row.tuned.loss:.3f}",
                 _num(row.base.perplexity), _num(row.tuned.perplexity)]
        if exact_match:
            cells += [_pct(row.base.exact_match), _pct(row.tuned.exact_match)]
        table.add_row(*cells, end_section=row is scored.sites[-1])
    Console().print(table)


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
