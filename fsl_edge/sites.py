"""A federation's data folder: one training shard per site, each with its held-out file.

Layout (what `fsl-edge data icd10` writes): `site-<name>.jsonl` and `heldout-<name>.jsonl`
(.txt works too). A site without a held-out file is trained on but not evaluated.
"""

from __future__ import annotations

from pathlib import Path

from .data import load_samples, tokenize
from .errors import DataError
from .simulation import SiteData

SUFFIXES = (".jsonl", ".txt")


def site_files(data_dir: str | Path) -> dict[str, tuple[Path, Path | None]]:
    """Map each site name to its (training file, held-out file or None), sorted by name."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("site-") and path.suffix in SUFFIXES:
            name = path.stem[len("site-"):]
            held = [folder / f"heldout-{name}{s}" for s in SUFFIXES]
            found[name] = (path, next((h for h in held if h.is_file()), None))
    if not found:
        raise DataError(f"{folder} has no site files: expected site-<name>.jsonl (or .txt), "
                        "e.g. from `fsl-edge data icd10 --out DIR`")
    return found


def load_sites(data_dir: str | Path, tokenizer, max_len: int,
               names: list[str] | None = None) -> list[SiteData]:
    """Load and tokenise the sites of `data_dir` (all, or those in `names`, in that order)."""
    files = site_files(data_dir)
    names = names or list(files)
    unknown = [n for n in names if n not in files]
    if unknown:
        raise DataError(f"no site {unknown[0]!r} in {data_dir}; it has {', '.join(files)}")
    sites = []
    for name in names:
        train, held = files[name]
        heldout = tokenize(load_samples(held), tokenizer, max_len) if held else []
        sites.append(SiteData(name, tokenize(load_samples(train), tokenizer, max_len), heldout))
    return sites
