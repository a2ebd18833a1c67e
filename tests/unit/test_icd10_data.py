"""The ICD-10-CM demo dataset: non-IID sites, disjoint held-out codes, atomic files, the CLI."""

from __future__ import annotations

import json
import re

import icd10
import pytest
import typer
from typer.testing import CliRunner

from fsl_edge.cli import data as data_cli
from fsl_edge.data import load_samples
from fsl_edge.errors import ConfigError
from fsl_edge.icd10_data import CHAPTER_BY_SLUG, CHAPTERS, build_icd10, dotted

PROMPT = re.compile(r"^ICD-10-CM ([A-Z][0-9A-Z]{2}(?:\.[0-9A-Z]{1,4})?):$")


def codes_in(path) -> list[str]:
    """The (undotted) codes of a shard, read back through the training loader."""
    codes = []
    for s in load_samples(path):
        match = PROMPT.match(s.prompt)
        assert match, s.prompt
        assert s.completion.startswith(" ")
        codes.append(match.group(1).replace(".", ""))
    return codes


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("icd10")
    return out, build_icd10(out, per_site=300, heldout=50, seed=3)


def test_every_code_falls_in_exactly_one_chapter():
    for code in icd10.codes:
        assert sum(c.contains(code) for c in CHAPTERS) == 1, code


def test_files_and_manifest(built):
    out, manifest = built
    assert [s.chapter for s in manifest.sites] == ["circulatory", "neoplasms", "injury"]
    assert json.loads((out / "manifest.json").read_text()) == json.loads(manifest.to_json())
    assert manifest.source == "icd10-cm" and manifest.seed == 3
    for site in manifest.sites:
        assert len(codes_in(out / site.train_file)) == site.train_count == 300
        assert len(codes_in(out / site.heldout_file)) == site.heldout_count == 50


def test_sites_are_non_iid_and_heldout_is_disjoint(built):
    out, _ = built
    prefixes = {"circulatory": ("I",), "neoplasms": ("C", "D"), "injury": ("S", "T")}
    for slug, starts in prefixes.items():
        train, held = codes_in(out / f"site-{slug}.jsonl"), codes_in(out / f"heldout-{slug}.jsonl")
        assert all(c.startswith(starts) and CHAPTER_BY_SLUG[slug].contains(c) for c in train + held)
        assert all(icd10.codes[c][0] for c in train + held)  # billable only
        assert not set(train) & set(held)
        assert len(set(train)) == len(train)


def test_descriptions_match_the_source(built):
    out, _ = built
    sample = load_samples(out / "site-circulatory.jsonl")[0]
    code = sample.prompt.removeprefix("ICD-10-CM ").removesuffix(":")
    assert sample.completion == " " + icd10.codes[code.replace(".", "")][1]


def test_deterministic_by_seed(tmp_path):
    a = build_icd10(tmp_path / "a", chapters=["respiratory"], per_site=20, heldout=5, seed=1)
    b = build_icd10(tmp_path / "b", chapters=["respiratory"], per_site=20, heldout=5, seed=1)
    build_icd10(tmp_path / "c", chapters=["respiratory"], per_site=20, heldout=5, seed=2)
    read = lambda d: (d / "site-respiratory.jsonl").read_text()  # noqa: E731
    assert a == b and read(tmp_path / "a") == read(tmp_path / "b")
    assert read(tmp_path / "a") != read(tmp_path / "c")


def test_no_cap_uses_every_billable_code(tmp_path):
    manifest = build_icd10(tmp_path, chapters=["blood"], heldout=10)
    billable = sum(1 for code, (b, _) in icd10.codes.items() if b and CHAPTER_BY_SLUG["blood"].contains(code))
    assert manifest.sites[0].train_count + manifest.sites[0].heldout_count == billable


def test_heldout_zero_writes_no_heldout_file(tmp_path):
    manifest = build_icd10(tmp_path, chapters=["ear"], per_site=5, heldout=0)
    assert manifest.sites[0].heldout_file is None
    assert not list(tmp_path.glob("heldout-*"))


def test_atomic_writes_leave_no_temp_files(built):
    out, _ = built
    shards = [f"{kind}-{s}.jsonl" for kind in ("site", "heldout") for s in ("circulatory", "neoplasms", "injury")]
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["manifest.json"])


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    build_icd10(tmp_path, chapters=["ear"], per_site=5, heldout=1)
    before = (tmp_path / "site-ear.jsonl").read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("fsl_edge.icd10_data.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        build_icd10(tmp_path, chapters=["ear"], per_site=9, heldout=1)
    assert (tmp_path / "site-ear.jsonl").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unknown_chapter_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown ICD-10-CM chapter.*'cardio'.*valid: infectious, neoplasms"):
        build_icd10(tmp_path, chapters=["circulatory", "cardio"])
    assert not list(tmp_path.iterdir())  # validated before anything is written


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chapters": []}, "no chapters selected"),
        ({"chapters": ["eye", "eye"]}, "listed twice"),
        ({"per_site": 0}, "per_site must be at least 1"),
        ({"heldout": -1}, "heldout must be 0 or more"),
        ({"chapters": ["special"]}, "'special' has 0 billable codes"),
        ({"chapters": ["blood"], "heldout": 10_000}, "leaves none to train on"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_icd10(tmp_path, **kwargs)


def test_dotted():
    assert dotted("I214") == "I21.4" and dotted("I10") == "I10" and dotted("S0000XA") == "S00.00XA"


def test_cli_icd10(tmp_path):
    root = typer.Typer()  # registered as in cli/app.py
    root.add_typer(data_cli.app, name="data")
    out = tmp_path / "demo"
    args = ["data", "icd10", "--out", str(out), "--chapters", "circulatory, respiratory", "--per-site", "7"]
    result = CliRunner().invoke(root, args + ["--heldout", "3", "--seed", "5"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"{out / 'site-circulatory.jsonl'}  7 train samples (I00-I99)" in lines
    assert f"{out / 'heldout-respiratory.jsonl'}  3 held-out samples" in lines
    assert len(lines) == 5  # two files per site, then the manifest
    assert json.loads((out / "manifest.json").read_text())["seed"] == 5


def test_cli_lets_errors_reach_the_app_edge(tmp_path):
    root = typer.Typer()
    root.add_typer(data_cli.app, name="data")
    result = CliRunner().invoke(root, ["data", "icd10", "--out", str(tmp_path), "--chapters", "cardio"])
    assert isinstance(result.exception, ConfigError)
