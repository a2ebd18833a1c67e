"""`fsl-edge audit verify|contributions`: check the federation's ledger; who contributed what."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="The federation's tamper-evident ledger: rounds, updates, contributions.",
                  no_args_is_help=True)

LedgerPath = Annotated[Path, typer.Argument(
    exists=True, help="The ledger (ledger.jsonl), or the checkpoint folder that holds it.")]
PublicKey = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False,
    help="The coordinator's ledger.pub, kept apart from the ledger: the key every entry must be "
         "signed with (default: the one the ledger names, which a full rewrite could replace).")]


def _paths(ledger: Path, checkpoints: Path | None) -> tuple[Path, Path | None]:
    """A folder stands for its ledger.jsonl and, unless --checkpoints says otherwise, its rounds."""
    from fsl_edge.ledger import LEDGER

    return (ledger / LEDGER, checkpoints or ledger) if ledger.is_dir() else (ledger, checkpoints)


def _fail(report) -> None:
    from fsl_edge.ledger import LedgerError

    first = report.first
    where = "" if first.index is None else f" at entry {first.index}"
    raise LedgerError(f"{report.path} fails verification{where} ({first.what}): {first.detail}")


@app.command()
def verify(
    ledger: LedgerPath,
    checkpoints: Annotated[Optional[Path], typer.Option(
        exists=True, file_okay=False,
        help="Checkpoint folder (round-NNNNNN/) to match against the ledger (default: LEDGER, "
             "when it is a folder).")] = None,
    public_key: PublicKey = None,
) -> None:
    """Check the ledger's hash chain and signatures, and the checkpoints against it."""
    from fsl_edge.audit import verify as verify_ledger

    path, checkpoints = _paths(ledger, checkpoints)
    report = verify_ledger(path, checkpoints, public_key)
    out = Console(highlight=False, soft_wrap=True)  # a hash is not cut in two
    pinned = "pinned" if report.pinned else "not pinned: pass --public-key"
    if not report.ok:
        out.print(f"{len(report.entries)} entries verify, signed by {report.key or '-'} ({pinned})")
        for problem in report.problems:
            out.print(f"[red]broken[/] {escape(str(problem))}")
        _fail(report)
    rejected = f"{report.rejected} rejected update" + ("" if report.rejected == 1 else "s")
    out.print(f"ledger OK: {len(report.entries)} entries, {report.rounds} rounds, {rejected}, "
              f"signed by {report.key} ({pinned})")
    if checkpoints is None:
        out.print("checkpoints not checked: pass --checkpoints")
    else:
        out.print(f"checkpoints OK: {', '.join(report.checkpoints) or 'none'} match the ledger")
    for index, torn in report.recovered:
        out.print(f"note: entry {index} records a torn line of {torn.bytes} bytes (a crash "
                  f"mid-append) moved to {escape(path.name)}.torn")


@app.command()
def contributions(
    ledger: LedgerPath,
    public_key: PublicKey = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
) -> None:
    """Show the rounds and tokens each node contributed to the run's result."""
    from fsl_edge.audit import verify as verify_ledger

    path, _ = _paths(ledger, None)
    report = verify_ledger(path, None, public_key)
    rows = report.contributions()
    if json_out:
        print(json.dumps({agent: asdict(c) for agent, c in rows.items()}))
    else:
        total = sum(c.tokens for c in rows.values()) or 1
        table = Table(title=f"{report.rounds} rounds", title_justify="left", box=box.SIMPLE_HEAD)
        table.add_column("node")
        for name in ("rounds", "tokens", "share", "rejected"):
            table.add_column(name, justify="right")
        for agent, c in rows.items():
            table.add_row(escape(agent), str(c.rounds), str(c.tokens),
                          f"{100 * c.tokens / total:.1f} %", str(c.rejected))
        Console().print(table if rows else "no rounds recorded yet")
    if not report.ok:  # counted up to the break: say so, and fail
        _fail(report)
