"""Shared by the benchmarks: the machine line and writing one section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

HEADER = ("# Benchmarks\n\nEvery figure here is written by a script in `bench/`; the command is "
          "under each section. Ratios are measured side by side in the same run.\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between this key's markers, leaving the others alone."""
    from fsl_edge.atomic import write_atomic

    text = path.read_text() if path.exists() else HEADER
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    section = f"{start}\n## {title}\n\n{body}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(path, text)


def report(key: str, title: str, lines: list[str], script: str, write: bool) -> None:
    """Print a section (its lines, then the machine and the command that made it) and, unless
    told not to, write it into BENCHMARKS.md."""
    import sys

    body = "\n".join([*lines, f"- Machine: {machine()}.",
                      f"- Command: `{' '.join([f'.venv/bin/python bench/{script}', *sys.argv[1:]])}`."])
    print(body)
    if write:
        write_section(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", key, title, body)
