"""HTML pieces for the report: every string that goes into the page goes through `esc`.

The page must open with no network: styles are inline, fonts are the system's, images are data
URIs; nothing here names a URL.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping
from typing import Any

DASH = "\u2014"  # an unknown value: never a 0


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def loss(x: float | None) -> str:
    return DASH if x is None else f"{x:.4f}"


def nbytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def ratio(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}x"


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], numeric_from: int = 1,
          raw: bool = False) -> str:
    """A table (no header row when every header is empty); columns from `numeric_from` on are
    right-aligned. `raw`: cells are HTML already (built by this module), else each is escaped."""
    cell = (lambda v: str(v)) if raw else esc
    num = ' class="n"'
    headers = list(headers)
    head = "" if not any(headers) else \
        "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>"
    body = "".join(
        "<tr>" + "".join(f"<td{num if i >= numeric_from else ''}>{cell(v)}</td>"
                         for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def data(value: Any) -> str:
    """Any JSON value as HTML: an object of objects or a list of objects as a table (a row
    each), an object as key/value rows, a list of values as one line."""
    if isinstance(value, Mapping):
        if not value:
            return DASH
        if all(isinstance(v, Mapping) for v in value.values()):  # e.g. node -> its choices
            keys = list(dict.fromkeys(k for v in value.values() for k in v))
            return table(["", *keys], [[esc(name), *(data(v.get(k, "")) for k in keys)]
                                       for name, v in value.items()], raw=True)
        return table(["", ""], [(esc(k), data(v)) for k, v in value.items()], numeric_from=2,
                     raw=True)
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            keys = list(dict.fromkeys(k for v in value for k in v))
            return table(keys, [[data(v.get(k, "")) for k in keys] for v in value],
                         numeric_from=len(keys), raw=True)
        return esc(", ".join(str(v) for v in value)) if value else DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return esc(f"{value:.6g}")
    return DASH if value is None else esc(value)


def figure(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return (f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}"></figure>')


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5rem; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; margin-bottom: 0.3rem; }
.meta { color: #555; margin-top: 0; }
nav a { margin-right: 0.8rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th { white-space: nowrap; }
td table { margin: 0; }
td table th, td table td { padding: 0.15rem 0.4rem; }
section { overflow-x: auto; }  /* a wide table (a planner's choices) scrolls, not the page */
figure { margin: 0.5rem 0 1rem; }
figure img { max-width: 100%; height: auto; display: block; }
.note { color: #555; font-style: italic; }
.ok { color: #136c2e; font-weight: bold; }
.bad { color: #b00020; font-weight: bold; }
"""


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")
