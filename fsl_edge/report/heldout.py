"""The held-out loss of a run before and after the federation, as `fsl-edge up` leaves it.

`<checkpoint dir>/heldout.json`: written once the run is evaluated, read by `fsl-edge report`.
The coordinator does not evaluate (it holds no site's data), so without this file a report of a
distributed run has no held-out loss; `fsl-edge simulate` evaluates every round instead.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from fsl_edge.atomic import write_atomic

HELDOUT = "heldout.json"


class Heldout(BaseModel):
    before: dict[str, float]
    """Per site: the base model's token-weighted loss on the site's held-out samples."""
    after: dict[str, float]
    """Per site, with the federation's final adapters."""
    overall_before: float
    overall_after: float
    """Token-weighted over every site's held-out samples."""
    samples: int | None = Field(default=None, ge=0)
    """The first this many held-out samples of each site were evaluated (all of a site's when it
    has fewer); None: every sample."""


def save_heldout(folder: Path, record: Heldout) -> Path:
    path = Path(folder) / HELDOUT
    write_atomic(path, record.model_dump_json(indent=1))
    return path
