"""`fsl-edge data ...`: prepare datasets on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fsl_edge.icd10_data import CHAPTER_BY_SLUG, DEFAULT_CHAPTERS, build_icd10

app = typer.Typer(help="Prepare local datasets (nothing is downloaded).", no_args_is_help=True)


@app.command()
def icd10(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the shards and manifest.json into.")],
    chapters: Annotated[
        str,
        typer.Option(help=f"Comma-separated chapters, one site each. Valid: {', '.join(CHAPTER_BY_SLUG)}."),
    ] = ",".join(DEFAULT_CHAPTERS),
    per_site: Annotated[Optional[int], typer.Option(help="Cap on training samples per site (default: all).")] = None,
    heldout: Annotated[int, typer.Option(help="Held-out codes per chapter, disjoint from training.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the train/held-out split.")] = 0,
) -> None:
    """Build the ICD-10-CM demo dataset: one non-IID site per chapter, plus held-out codes."""
    slugs = [c.strip() for c in chapters.split(",") if c.strip()]
    manifest = build_icd10(out, chapters=slugs, per_site=per_site, heldout=heldout, seed=seed)
    console = Console(soft_wrap=True)  # one line per file, however long the path

    def path(name: str) -> str:
        return f"[bold]{escape(str(out / name))}[/]"

    for site in manifest.sites:
        console.print(f"{path(site.train_file)}  {site.train_count} train samples ({site.categories})")
        if site.heldout_file:
            console.print(f"{path(site.heldout_file)}  {site.heldout_count} held-out samples")
    console.print(f"{path('manifest.json')}  {manifest.source} {manifest.source_version}, seed {seed}")
