"""Check a ledger, and the checkpoints beside it: what `fsl-edge audit verify` shows.

The chain is checked entry by entry (fsl_edge.ledger.read_chain) and stops at the first break.
Then each checkpoint folder `round-NNNNNN/` is matched against the ledger's entry for its round
(the last one not superseded by a resume): the SHA-256 of its site and trunk adapters must be
the ones the coordinator signed when the round closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import SafetensorError

from fsl_edge.ledger import Break, Contribution, contributions, effective_rounds, read_chain
from fsl_edge.ledger_format import (Entry, LedgerError, Resume, RoundEntry, Torn, file_digest,
                                    key_id, load_public_key)

ROUND_FOLDER = re.compile(r"round-(\d+)")  # coordinator.checkpoint's; .round-* are unfinished
ADAPTERS = (("site_adapter.safetensors", "site_adapter"),
            ("server_adapter.safetensors", "server_adapter"))


@dataclass(frozen=True)
class Problem:
    index: int | None
    """The ledger entry at fault (for a checkpoint: the entry it contradicts); None where no
    entry is involved (a checkpoint for a round the ledger does not hold)."""
    what: str
    """torn, malformed, not_canonical, index, link, genesis, key, signature, or checkpoint."""
    detail: str

    def __str__(self) -> str:
        where = "" if self.index is None else f"entry {self.index}: "
        return f"{where}{self.detail}"


@dataclass
class Report:
    path: Path
    entries: list[Entry] = field(default_factory=list)
    """The entries that verified: all of them when the chain is whole."""
    key: str = ""
    """The key the entries were checked with (`key_id`)."""
    pinned: bool = False
    """Whether that key was given, rather than taken from the genesis entry."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint folders whose adapters match the ledger."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        """The problem at the earliest entry (a checkpoint no entry covers comes last)."""
        order = sorted(self.problems, key=lambda p: (p.index is None, p.index or 0))
        return order[0] if order else None

    @property
    def rounds(self) -> int:
        return len(effective_rounds(self.entries))

    @property
    def rejected(self) -> int:
        return sum(c.rejected for c in self.contributions().values())

    @property
    def recovered(self) -> list[tuple[int, Torn]]:
        """Torn lines a restarted coordinator moved aside: (index of its resume entry, what)."""
        return [(e.index, e.torn) for e in self.entries if isinstance(e, Resume) and e.torn]

    def contributions(self) -> dict[str, Contribution]:
        return contributions(self.entries)


def verify(path: Path, checkpoint_dir: Path | None = None,
           public_key: Path | Ed25519PublicKey | None = None) -> Report:
    """Check the ledger at `path` and, given `checkpoint_dir`, each checkpoint round in it.

    `public_key` pins the coordinator's key (ledger.pub, or the genesis entry's base64); without
    it the key in the genesis entry is trusted, so only a partial rewrite is detected.
    """
    pinned = load_public_key(public_key) if isinstance(public_key, Path) else public_key
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise LedgerError(f"cannot read the ledger {path}: {e.strerror or e}") from e
    chain = read_chain(data, pinned)
    report = Report(Path(path), chain.entries, key_id(chain.key) if chain.key else "",
                    pinned is not None)
    if chain.broken is not None:
        report.problems.append(_problem(chain.broken))
    if checkpoint_dir is not None:
        _check_checkpoints(Path(checkpoint_dir), report)
    return report


def _problem(b: Break) -> Problem:
    return Problem(b.index, b.what, b.detail)


def _check_checkpoints(folder: Path, report: Report) -> None:
    if not folder.is_dir():
        raise LedgerError(f"the checkpoint folder {folder} does not exist")
    rounds = effective_rounds(report.entries)
    since = report.entries[0].round if report.entries else 0  # the genesis's
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = ROUND_FOLDER.fullmatch(path.name)
        if match is None:
            continue
        n = int(match.group(1))
        if n <= since:
            continue  # completed before the ledger began: nothing vouches for it either way
        entry = rounds.get(n)
        if entry is None:
            report.problems.append(Problem(None, "checkpoint", f"{path.name}: the ledger has no "
                                           f"verified entry for round {n}"))
            continue
        bad = [p for p in (_compare(path, name, attr, entry) for name, attr in ADAPTERS) if p]
        report.problems.extend(bad)
        if not bad:
            report.checkpoints.append(path.name)


def _compare(folder: Path, name: str, attr: str, entry: RoundEntry) -> Problem | None:
    want = getattr(entry, attr)
    try:
        got = file_digest(folder / name)
    except (OSError, SafetensorError) as e:
        return Problem(entry.index, "checkpoint", f"{folder.name}/{name} cannot be read: {e}")
    if got != want:
        return Problem(entry.index, "checkpoint", f"{folder.name}/{name} does not match round "
                       f"{entry.round}'s entry (sha256 {got[:12]}…, the ledger says {want[:12]}…)")
    return None

