"""`fsl-edge models ...`: materialise and list local models (nothing is downloaded)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


app = typer.Typer(help="Local models: the bundled SmolLM2 and the models cache.",
                  no_args_is_help=True)


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="Bundled model: smollm2.")] = "smollm2",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
) -> None:
    """Convert a bundled model once into a normal HF folder in the models cache."""
    from fsl_edge.models import pull as pull_model

    path = pull_model(name, dtype=dtype, force=force)
    Console().print(f"{name} ready at [bold]{path}[/]")


@app.command("list")
def list_() -> None:
    """Show the models in the cache."""
    from fsl_edge.models import list_cached

    cached = list_cached()
    table = Table("name", "architecture", "dtype", "size", "path")
    for m in cached:
        table.add_row(m.name, m.architecture, m.dtype, f"{m.size_bytes / 2**20:.0f} MiB", str(m.path))
    Console().print(table if cached else "no models cached yet: run `fsl-edge models pull smollm2`")
