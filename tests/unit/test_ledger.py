"""The tamper-evident ledger: a run's ledger verifies; each kind of tampering is found where it is."""

import base64
import json
import stat
from types import SimpleNamespace

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.models import TyperInfo

from fsl_edge.atomic import save_tensors
from fsl_edge.audit import verify
from fsl_edge.cli import app as cli_app
from fsl_edge.cli import audit as audit_cli
from fsl_edge.coordinator import checkpoint
from fsl_edge.ledger import KEY, LEDGER, PUBLIC_KEY, Ledger, LedgerError
from fsl_edge.ledger_format import SIGNED, canonical, file_digest, sha256, tensor_digest

RUN, FINGERPRINT = "run-7", {"model": "tiny-random-llama", "training": {"lr": 0.001}}
TOKENS = {1: {"site-a": 100, "site-b": 50}, 2: {"site-a": 80, "site-c": 40}, 3: {"site-b": 60}}


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.lora_A.weight": torch.randn(2, 8, generator=g),
            "layers.0.lora_B.weight": torch.randn(8, 2, generator=g).to(torch.bfloat16)}


def close_round(ledger: Ledger, folder, round_: int, tokens: dict[str, int], rejected=()) -> None:
    """What the coordinator does when a round closes: the ledger entry, then the checkpoint."""
    site, server = adapter(1000 + round_), adapter(2000 + round_)
    uploads = {a: (n, adapter(round_ * 10 + i)) for i, (a, n) in enumerate(sorted(tokens.items()))}
    ledger.append_round(round_, uploads, site, server, rejected)
    trunk = SimpleNamespace(adapter=lambda: server,
                            optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    checkpoint.save(folder, round_, site, trunk, {"fingerprint": FINGERPRINT})


@pytest.fixture
def run(tmp_path):
    """A checkpoint folder after three rounds: genesis + 3 round entries + 1 rejected entry."""
    folder = tmp_path / "ckpt"
    ledger = Ledger.open(folder / LEDGER, None, RUN, FINGERPRINT)
    close_round(ledger, folder, 1, TOKENS[1])
    ledger.append_rejected(2, "site-d", "non_finite")
    close_round(ledger, folder, 2, TOKENS[2], rejected=[("site-b", "norm", adapter(99))])
    close_round(ledger, folder, 3, TOKENS[3])
    return folder


def lines(folder) -> list[bytes]:
    return (folder / LEDGER).read_bytes().splitlines()


def write(folder, rows: list[bytes]) -> None:
    (folder / LEDGER).write_bytes(b"".join(r + b"\n" for r in rows))


def first(folder, **kw):
    report = verify(folder / LEDGER, folder, folder / PUBLIC_KEY, **kw)
    assert not report.ok
    return report.first


def test_a_ledger_of_several_rounds_verifies_with_its_checkpoints(run):
    report = verify(run / LEDGER, run, run / PUBLIC_KEY)
    assert report.ok, report.problems
    assert [e.kind for e in report.entries] == ["genesis", "round", "rejected", "round", "round"]
    assert report.rounds == 3 and report.rejected == 2 and report.pinned
    assert report.checkpoints == ["round-000002", "round-000003"]  # the coordinator keeps two
    entry = report.entries[3]
    assert entry.participants == ["site-a", "site-c"] and entry.tokens == TOKENS[2]
    assert entry.updates["site-a"] == tensor_digest(adapter(20))
    assert entry.rejected[0].reason == "norm"
    assert entry.rejected[0].update == tensor_digest(adapter(99))
    assert entry.site_adapter == file_digest(run / "round-000002" / "site_adapter.safetensors")
    assert stat.S_IMODE((run / KEY).stat().st_mode) == 0o600


def test_contributions_add_up(run):
    report = verify(run / LEDGER)
    got = {a: (c.rounds, c.tokens, c.rejected) for a, c in report.contributions().items()}
    assert got == {"site-a": (2, 180, 0), "site-b": (2, 110, 1), "site-c": (1, 40, 0),
                   "site-d": (0, 0, 1)}
    assert sum(c.tokens for c in report.contributions().values()) == \
        sum(sum(t.values()) for t in TOKENS.values())


def test_a_resumed_run_counts_a_redone_round_once(run):
    # round 4 was written, then the coordinator died before its checkpoint: it resumes after 3
    Ledger.open(run / LEDGER, None, RUN, FINGERPRINT).append_round(
        4, {"site-a": (999, adapter(1))}, adapter(2), adapter(3))
    ledger = Ledger.open(run / LEDGER, None, RUN, FINGERPRINT, resumed=3)
    close_round(ledger, run, 4, {"site-c": 10})
    assert ledger.contributions()["site-a"].tokens == 180  # not 1179: its round 4 was superseded
    report = verify(run / LEDGER, run, run / PUBLIC_KEY)
    assert report.ok, report.problems
    assert report.rounds == 4 and report.checkpoints == ["round-000003", "round-000004"]


def test_an_edited_field_is_found_at_its_entry(run):
    rows = lines(run)
    entry = json.loads(rows[3])
    entry["tokens"]["site-a"] = 8000  # still canonical JSON, still linked: only the signature tells
    rows[3] = canonical(entry)
    write(run, rows)
    problem = first(run)
    assert (problem.index, problem.what) == (3, "signature")


def test_an_edit_by_hand_is_found_at_its_entry(run):
    rows = lines(run)
    rows[1] = rows[1].replace(b'"tokens":{', b'"tokens": {')
    write(run, rows)
    assert (first(run).index, first(run).what) == (1, "not_canonical")


def test_a_deleted_entry_is_found_where_it_was(run):
    rows = lines(run)
    write(run, rows[:2] + rows[3:])
    assert (first(run).index, first(run).what) == (2, "index")


def test_a_deleted_last_entry_leaves_its_checkpoint_unvouched_for(run):
    write(run, lines(run)[:-1])
    problem = first(run)
    assert (problem.index, problem.what) == (None, "checkpoint")
    assert "round-000003" in problem.detail


def test_two_reordered_entries_are_found_at_the_first(run):
    rows = lines(run)
    rows[2], rows[3] = rows[3], rows[2]
    write(run, rows)
    assert (first(run).index, first(run).what) == (2, "index")


@pytest.mark.parametrize("signer", ["none", "another key"])
def test_an_inserted_entry_with_a_correct_link_is_found_by_its_signature(run, signer):
    rows = lines(run)
    forged = {"kind": "round", "round": 2, "index": 2, "prev": sha256(rows[1]),
              "time": "2024-01-01T00:00:00.000+00:00", "participants": ["mallory"],
              "tokens": {"mallory": 10**9}, "updates": {"mallory": "0" * 64},
              "site_adapter": "1" * 64, "server_adapter": "2" * 64, "rejected": []}
    key = Ed25519PrivateKey.generate()
    forged["sig"] = base64.b64encode(b"\0" * 64 if signer == "none" else
                                     key.sign(SIGNED + canonical(forged))).decode()
    write(run, rows[:2] + [canonical(forged)] + rows[2:])
    assert (first(run).index, first(run).what) == (2, "signature")


def test_a_ledger_rewritten_with_another_key_fails_only_against_the_pinned_key(run, tmp_path):
    other = tmp_path / "other"
    ledger = Ledger.open(other / LEDGER, None, RUN, FINGERPRINT)
    ledger.append_round(1, {"mallory": (10**9, adapter(0))}, adapter(1), adapter(2))
    assert verify(other / LEDGER).ok  # consistent with itself
    report = verify(other / LEDGER, None, run / PUBLIC_KEY)
    assert (report.first.index, report.first.what) == (0, "key")


def test_a_torn_last_line_is_reported_then_set_aside_and_recorded_on_reopen(run):
    whole = (run / LEDGER).read_bytes()
    torn = lines(run)[3][:57]  # a crash part-way through an append
    (run / LEDGER).write_bytes(whole + torn)
    problem = first(run)
    assert (problem.index, problem.what) == (5, "torn")
    ledger = Ledger.open(run / LEDGER, None, RUN, FINGERPRINT, resumed=3)
    assert (run / (LEDGER + ".torn")).read_bytes() == torn + b"\n"  # kept, not dropped
    report = verify(run / LEDGER, run, run / PUBLIC_KEY)
    assert report.ok, report.problems
    (index, note), = report.recovered
    assert index == 5 == ledger.entries[-1].index and note.bytes == len(torn) == 57
    assert note.offset == len(whole) and note.sha256 == sha256(torn)


def test_a_crash_while_writing_the_genesis_starts_the_ledger_again(tmp_path):
    (tmp_path / LEDGER).write_bytes(b'{"fingerprint":"4b78')
    ledger = Ledger.open(tmp_path / LEDGER, None, RUN, FINGERPRINT)
    assert [e.kind for e in ledger.entries] == ["genesis"] and verify(tmp_path / LEDGER).ok
    assert (tmp_path / (LEDGER + ".torn")).read_bytes() == b'{"fingerprint":"4b78\n'


def test_a_failed_append_leaves_no_half_line(run, monkeypatch):
    import fsl_edge.ledger as ledger_module

    ledger = Ledger.open(run / LEDGER, None, RUN, FINGERPRINT)
    before = (run / LEDGER).read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ledger_module.os, "fsync", full_disk)
        with pytest.raises(OSError):
            ledger.append_rejected(4, "site-a", "non_finite")
    assert (run / LEDGER).read_bytes() == before
    ledger.append_rejected(4, "site-a", "non_finite")
    assert verify(run / LEDGER).ok


def test_a_checkpoint_that_does_not_match_the_ledger_is_found(run):
    save_tensors(run / "round-000003" / "server_adapter.safetensors", adapter(7))
    problem = first(run)
    assert (problem.index, problem.what) == (4, "checkpoint")
    assert "round-000003/server_adapter.safetensors" in problem.detail


def test_a_checkpoint_with_an_adapter_cast_to_another_dtype_does_not_match(run):
    path = run / "round-000002" / "site_adapter.safetensors"
    from safetensors.torch import load_file

    save_tensors(path, {k: v.to(torch.float16) for k, v in load_file(path).items()})
    assert (first(run).index, first(run).what) == (3, "checkpoint")


def test_tensor_digest_names_dtype_shape_and_values():
    a = adapter(0)
    assert tensor_digest(a) == tensor_digest(dict(reversed(list(a.items()))))  # order-free
    changed = [{**a, "layers.0.lora_A.weight": a["layers.0.lora_A.weight"].reshape(8, 2)},
               {**a, "layers.0.lora_A.weight": a["layers.0.lora_A.weight"].double()},
               {**a, "layers.0.lora_A.weight": a["layers.0.lora_A.weight"] + 1e-7},
               {k.replace("0", "1"): v for k, v in a.items()}, {}]
    assert len({tensor_digest(a)} | {tensor_digest(c) for c in changed}) == 1 + len(changed)


def test_reopening_refuses_another_run_a_broken_ledger_and_another_key(run):
    with pytest.raises(LedgerError, match="another run"):
        Ledger.open(run / LEDGER, None, "run-8", FINGERPRINT)
    with pytest.raises(LedgerError, match="another run"):
        Ledger.open(run / LEDGER, None, RUN, {**FINGERPRINT, "model": "other"})
    with pytest.raises(LedgerError, match="entry 0"):
        Ledger.open(run / LEDGER, Ed25519PrivateKey.generate(), RUN, FINGERPRINT)
    rows = lines(run)
    write(run, rows[:1] + rows[2:])
    with pytest.raises(LedgerError, match="broken at entry 1"):
        Ledger.open(run / LEDGER, None, RUN, FINGERPRINT)


# --- the command ---------------------------------------------------------------------------
@pytest.fixture
def main(monkeypatch):
    """`fsl-edge` with `audit` registered, as cli/app.py will do (a no-op once it does)."""
    groups = cli_app.app.registered_groups
    if not any(g.name == "audit" for g in groups):
        monkeypatch.setattr(cli_app.app, "registered_groups",
                            [*groups, TyperInfo(audit_cli.app, name="audit")])
    monkeypatch.setenv("COLUMNS", "200")
    return cli_app.main


def test_audit_verify_says_ok_with_counts(run, main, capsys):
    assert main(["audit", "verify", str(run), "--public-key", str(run / PUBLIC_KEY)]) == 0
    out = capsys.readouterr().out
    assert "ledger OK: 5 entries, 3 rounds, 2 rejected updates" in out and "(pinned)" in out
    assert "checkpoints OK: round-000002, round-000003" in out


def test_audit_verify_names_the_first_broken_entry_and_fails(run, main, capsys):
    rows = lines(run)
    write(run, rows[:2] + rows[3:])
    code = main(["audit", "verify", str(run / LEDGER), "--checkpoints", str(run)])
    assert code == LedgerError.exit_code == 7
    captured = capsys.readouterr()
    assert "broken entry 2: line 3 holds entry 3" in captured.out
    assert captured.err.startswith("error: ") and "at entry 2 (index)" in captured.err


def test_audit_contributions_prints_tokens_and_rounds_per_node(run, main, capsys):
    assert main(["audit", "contributions", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["site-a"] == {"rounds": 2, "tokens": 180, "rejected": 0}
    assert main(["audit", "contributions", str(run)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "site-b" in line)
    assert row.split()[:4] == ["site-b", "2", "110", "33.3"]

