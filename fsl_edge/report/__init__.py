"""`fsl-edge report`: one self-contained HTML page about a run, plots included.

The page holds everything (PNG figures as data URIs, inline styles), so it opens in a browser
with no network. A run folder is a coordinator's checkpoint folder (what `fsl-edge up` leaves in
runs/up/checkpoints) or the --out folder of `fsl-edge simulate` (fsl_edge.report.sources).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

__all__ = ["render_report", "write_report"]


def render_report(folder: Path, public_key: Path | None = None) -> str:
    """The report of the run in `folder` as an HTML document."""
    from .markup import esc, page
    from .sections import SECTIONS
    from .sources import load_run

    run = load_run(folder, public_key)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{s.__name__}">{esc(s.__name__)}</a>' for s in SECTIONS)
    head = (f"<h1>fsl-edge report: {esc(run.name)}</h1>"
            f'<p class="meta">{esc(run.model)} · {esc(run.mode)} · generated {esc(when)}</p>'
            f"<nav>{nav}</nav>")
    return page(f"fsl-edge report: {run.name}", head + "".join(s(run) for s in SECTIONS))


def write_report(folder: Path, out: Path, public_key: Path | None = None) -> Path:
    """Render the report of `folder` and write it to `out` atomically; return `out`."""
    from fsl_edge.atomic import write_atomic

    html = render_report(folder, public_key)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, html)
    out.chmod(0o644)  # a page to share; the temp file behind the atomic write was 0600
    return out
