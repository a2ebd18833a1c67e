"""The federation's tamper-evident ledger: a hash chain of signed JSON lines, one entry an event.

`<checkpoint dir>/ledger.jsonl` starts with a genesis entry (run, settings fingerprint, the
coordinator's public key); then one entry per closed round (participants, tokens, a hash of each
accepted update, of the aggregated site adapter and of the trunk adapter, rejected updates and
why), per update refused on its own, and per coordinator restart. Each entry holds the SHA-256 of
the line before it (`prev`) and the coordinator's Ed25519 signature over the rest (`sig`), so an
edited, deleted, reordered or inserted entry breaks the chain where it happened
(`fsl_edge.audit.verify` finds it). The entry format is fsl_edge.ledger_format. A writer with the
private key could rewrite the whole chain: keep a copy of `ledger.pub` elsewhere and pin it when
verifying.

The coordinator writes a round's entry before the round's checkpoint: a crash between the two
leaves an entry for a round no checkpoint holds, and the restarted coordinator's `resume` entry
says which round it went on from (entries for later rounds are superseded). The other order
would leave a checkpoint the ledger never vouched for.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from fsl_edge.ledger_format import (ENTRY, KEY, LEDGER, PUBLIC_KEY, SIGNED, TORN_SUFFIX, ZERO,
                                    Entry, LedgerError, RejectedEntry, Resume, RoundEntry, Torn,
                                    canonical, key_id, load_or_create_key, load_public_key,
                                    raw_public_key, sha256, tensor_digest)

if TYPE_CHECKING:
    import torch

    Tensors = Mapping[str, torch.Tensor]

log = logging.getLogger("fsl_edge.ledger")

__all__ = ["LEDGER", "KEY", "PUBLIC_KEY", "Ledger", "LedgerError", "Contribution", "contributions",
           "read_chain", "effective_rounds"]


# --- reading the chain ------------------------------------------------------------------------
@dataclass(frozen=True)
class Break:
    """Where and why the chain stops verifying."""

    index: int
    what: str  # torn, malformed, not_canonical, index, link, genesis, key, signature
    detail: str


@dataclass
class Chain:
    entries: list[Entry]
    """The entries that verified, in order (all of them when `broken` is None)."""
    key: Ed25519PublicKey | None
    broken: Break | None
    torn: bytes | None
    """Bytes after the last newline: an append a crash cut short."""
    last: str = ZERO
    """SHA-256 of the last entry that verified: the next entry's `prev`."""


def split_lines(data: bytes) -> tuple[list[bytes], bytes | None]:
    """Complete lines (without their newline) and the torn tail, if the data does not end in one."""
    *lines, tail = data.split(b"\n")
    return lines, (tail or None)


def read_chain(data: bytes, pinned: Ed25519PublicKey | None = None) -> Chain:
    """Check each line in turn: form, position, link, key, signature; stop at the first break."""
    lines, torn = split_lines(data)
    chain = Chain([], pinned, None, torn)
    for i, raw in enumerate(lines):
        entry, why = _check(i, raw, chain)
        if why is not None:
            chain.broken = Break(i, *why)
            return chain
        chain.entries.append(entry)
        chain.last = sha256(raw)
    if torn is not None:
        chain.broken = Break(len(lines), "torn", f"the last line is incomplete ({len(torn)} bytes, "
                             "no newline): a crash, or a write in progress, cut an append short")
    elif not lines:
        chain.broken = Break(0, "malformed", "the ledger is empty: no genesis entry")
    return chain


def _check(i: int, raw: bytes, chain: Chain) -> tuple[Entry | None, tuple[str, str] | None]:
    try:
        fields = json.loads(raw)
        spelled = canonical(fields)
    except ValueError as e:
        return None, ("malformed", f"not JSON: {e}")
    if spelled != raw:
        return None, ("not_canonical", "not in the canonical form the coordinator writes "
                      "(edited by hand?)")
    try:
        entry = ENTRY.validate_python(fields)
    except ValidationError as e:
        err = e.errors()[0]
        return None, ("malformed", f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
    if entry.index != i:
        return None, ("index", f"line {i + 1} holds entry {entry.index}: an entry before it was "
                      "deleted or inserted, or entries were moved")
    if entry.prev != chain.last:
        return None, ("link", "its prev hash is not the hash of the line before it: an entry was "
                      "deleted, moved or inserted, or the one before it was edited")
    if (i == 0) != (entry.kind == "genesis"):
        return None, ("genesis", "the first entry must be the genesis, and only the first")
    if i == 0:
        try:
            key = load_public_key(entry.public_key)
        except LedgerError as e:
            return None, ("malformed", f"public_key: {e}")
        if chain.key is not None and raw_public_key(chain.key) != entry.public_key:
            return None, ("key", f"signed with {key_id(key)}, not the pinned {key_id(chain.key)}")
        chain.key = key
    payload = canonical({k: v for k, v in fields.items() if k != "sig"})
    try:
        chain.key.verify(base64.b64decode(entry.sig, validate=True), SIGNED + payload)
    except (InvalidSignature, ValueError):
        return None, ("signature", "its signature does not verify: a field was edited, or "
                      "the coordinator's key did not write it")
    return entry, None


def effective_rounds(entries: Iterable[Entry]) -> dict[int, RoundEntry]:
    """The round entries the run went on from: a resume supersedes entries for later rounds."""
    rounds: dict[int, RoundEntry] = {}
    for e in entries:
        if isinstance(e, RoundEntry):
            rounds[e.round] = e
        elif isinstance(e, Resume):
            rounds = {r: x for r, x in rounds.items() if r <= e.round}
    return rounds


@dataclass
class Contribution:
    rounds: int = 0
    tokens: int = 0
    rejected: int = 0


def contributions(entries: Sequence[Entry]) -> dict[str, Contribution]:
    """Rounds and tokens each agent contributed to the run's result, and updates refused."""
    out: dict[str, Contribution] = {}
    for e in effective_rounds(entries).values():
        for agent, tokens in e.tokens.items():
            c = out.setdefault(agent, Contribution())
            c.rounds, c.tokens = c.rounds + 1, c.tokens + tokens
        for r in e.rejected:
            out.setdefault(r.agent, Contribution()).rejected += 1
    for e in entries:
        if isinstance(e, RejectedEntry):
            out.setdefault(e.agent, Contribution()).rejected += 1
    return dict(sorted(out.items()))


# --- writing ----------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    """A ledger open for appending by its coordinator; every append is on disk when it returns."""

    def __init__(self, path: Path, key: Ed25519PrivateKey, entries: list[Entry], last: str):
        self.path, self.key, self.entries, self.last = path, key, entries, last

    @classmethod
    def open(cls, path: Path, key: Ed25519PrivateKey | Path | None, run_id: str,
             fingerprint: Mapping[str, Any], resumed: int | None = None) -> Ledger:
        """Start the ledger, or check and reopen it; `key` None: `ledger.key` beside it.

        `resumed`: the round of the checkpoint the coordinator starts from (None: the ledger's
        last round, or 0 for a new ledger); entries for later rounds are superseded. Reopening
        checks the whole chain against the key and refuses a broken ledger or another run's; a
        torn last line (a crash mid-append) is moved to `<ledger>.torn`; the resume entry says so.
        """
        path = Path(path)
        if not isinstance(key, Ed25519PrivateKey):
            key = load_or_create_key(Path(key) if key is not None else path.parent / KEY)
        fp = sha256(canonical(dict(fingerprint)))
        data = path.read_bytes() if path.is_file() else b""
        chain = read_chain(data, key.public_key())
        if chain.broken is not None and chain.broken.what != "torn" and data:
            raise LedgerError(f"{path} is broken at entry {chain.broken.index}: "
                              f"{chain.broken.detail}; see `fsl-edge audit verify {path}`, and "
                              "move it aside to start a new ledger")
        torn = _set_aside(path, data, chain.torn) if chain.torn is not None else None
        if not chain.entries:  # new, or a crash cut its genesis short
            path.parent.mkdir(parents=True, exist_ok=True)
            ledger = cls(path, key, [], ZERO)
            ledger._append({"kind": "genesis", "run": run_id, "fingerprint": fp,
                            "public_key": raw_public_key(key.public_key()), "round": resumed or 0})
            _fsync_dir(path.parent)
            return ledger
        genesis = chain.entries[0]
        if (genesis.run, genesis.fingerprint) != (run_id, fp):
            raise LedgerError(f"{path} is the ledger of another run or configuration (run "
                              f"{genesis.run!r}); use a new checkpoint folder")
        ledger = cls(path, key, chain.entries, chain.last)
        last = max(effective_rounds(chain.entries), default=genesis.round)
        if resumed is not None and resumed > last:
            log.warning("resuming after round %d, but the ledger's last round is %d: "
                        "`fsl-edge audit verify` will report the checkpoint", resumed, last)
        resumed = last if resumed is None else resumed
        if torn is not None:
            log.warning("%s ended in a torn line (%d bytes, a crash mid-append): moved to %s%s",
                        path, torn.bytes, path.name, TORN_SUFFIX)
        ledger._append({"kind": "resume", "round": resumed,
                        "torn": None if torn is None else torn.model_dump()})
        return ledger

    def append_round(self, round_: int, uploads: Mapping[str, tuple[int, Tensors]],
                     site_adapter: Tensors, server_adapter: Tensors,
                     rejected: Sequence[tuple[str, str] | tuple[str, str, Tensors]] = ()
                     ) -> RoundEntry:
        """Record a closed round: `uploads` agent -> (tokens, update averaged in); `rejected`
        (agent, reason) or (agent, reason, update) for updates the round refused."""
        names = sorted(uploads)
        return self._append({
            "kind": "round", "round": round_, "participants": names,
            "tokens": {a: int(uploads[a][0]) for a in names},
            "updates": {a: tensor_digest(uploads[a][1]) for a in names},
            "site_adapter": tensor_digest(site_adapter),
            "server_adapter": tensor_digest(server_adapter),
            "rejected": [_rejection(*r) for r in rejected]})

    def append_rejected(self, round_: int, agent: str, reason: str,
                        update: Tensors | None = None) -> RejectedEntry:
        """Record an update refused on its own, outside a round's close."""
        return self._append({"kind": "rejected", "round": round_,
                             **_rejection(agent, reason, update)})

    def contributions(self) -> dict[str, Contribution]:
        return contributions(self.entries)

    def _append(self, fields: dict) -> Any:
        fields = {**fields, "index": len(self.entries), "prev": self.last,
                  "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")}
        fields["sig"] = base64.b64encode(self.key.sign(SIGNED + canonical(fields))).decode()
        entry = ENTRY.validate_python(fields)  # a bug here must not reach the file
        line = canonical(fields)
        # one line, on the disk before the caller goes on to the checkpoint; unbuffered, so a
        # failed write (disk full) can be cut off and leaves no half line for the next to follow
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line + b"\n")
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
        self.entries.append(entry)
        self.last = sha256(line)
        return entry


def _rejection(agent: str, reason: str, update: Tensors | None = None) -> dict:
    return {"agent": agent, "reason": reason,
            "update": None if update is None else tensor_digest(update)}


def _set_aside(path: Path, data: bytes, torn: bytes) -> Torn:
    """Move a torn tail to `<ledger>.torn` (kept, appended), then cut it from the ledger."""
    offset = len(data) - len(torn)
    with open(path.with_name(path.name + TORN_SUFFIX), "ab") as f:
        f.write(torn + b"\n")
        f.flush()
        os.fsync(f.fileno())
    with open(path, "r+b") as f:  # kept first, cut second: a crash between leaves a copy, no loss
        f.truncate(offset)
        os.fsync(f.fileno())
    return Torn(offset=offset, bytes=len(torn), sha256=sha256(torn))
