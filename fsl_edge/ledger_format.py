"""What a ledger entry is, and how it is spelled, hashed and signed (fsl_edge.ledger writes them).

Every entry is one line of canonical JSON (sorted keys, no spaces, ASCII). `sig` is the
coordinator's Ed25519 signature over `SIGNED` + the canonical JSON of the other fields; `prev`
is the SHA-256 of the previous line's bytes. Adapters are identified by `tensor_digest`, which
depends on names, dtypes, shapes and values only, not on how the tensors were serialised.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from fsl_edge.atomic import write_atomic
from fsl_edge.errors import PermanentError

if TYPE_CHECKING:  # torch is heavy: `fsl-edge audit verify` without checkpoints does not need it
    import torch

LEDGER, KEY, PUBLIC_KEY = "ledger.jsonl", "ledger.key", "ledger.pub"
TORN_SUFFIX = ".torn"
"""A torn last line found on open is moved to `<ledger>.torn` (appended), never just dropped."""
ZERO = "0" * 64  # the genesis entry's `prev`
SIGNED = b"fsl-edge ledger v1\n"  # domain separation: a ledger signature signs nothing else
_TENSORS = b"fsl-edge tensors v1\n"


class LedgerError(PermanentError):
    """The ledger cannot be read, is broken, or belongs to another run."""

    exit_code = 7


# --- the entry format -------------------------------------------------------------------------
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Entry(_Strict):
    index: int = Field(ge=0)
    """Position in the ledger, from 0: a gap or a repeat means an entry was deleted or moved."""
    time: str
    """UTC, ISO 8601, as the coordinator's clock had it."""
    prev: Sha256
    """SHA-256 of the previous line (its bytes, without the newline); ZERO for the genesis."""
    sig: str
    """Ed25519 signature, base64, over `SIGNED` + the canonical JSON of every other field."""


class Genesis(_Entry):
    kind: Literal["genesis"]
    run: str
    fingerprint: Sha256
    """SHA-256 of the canonical JSON of the run's settings fingerprint (model, training)."""
    public_key: str
    """The coordinator's Ed25519 public key, raw, base64."""
    round: int = Field(ge=0)
    """Rounds already completed when the ledger began (0 unless added to a running federation)."""


class Rejection(_Strict):
    agent: str
    reason: str
    update: Sha256 | None = None
    """The refused update's hash, where it could be decoded."""


class RoundEntry(_Entry):
    kind: Literal["round"]
    round: int = Field(ge=1)
    participants: list[str]
    """Agents whose update was averaged in, sorted."""
    tokens: dict[str, int]
    updates: dict[str, Sha256]
    """Each accepted update's `tensor_digest`."""
    site_adapter: Sha256
    """The aggregated site adapter after the round (the checkpoint's site_adapter.safetensors)."""
    server_adapter: Sha256
    """The trunk adapter after the round (the checkpoint's server_adapter.safetensors)."""
    rejected: list[Rejection]


class RejectedEntry(_Entry, Rejection):
    kind: Literal["rejected"]
    round: int = Field(ge=0)


class Torn(_Strict):
    offset: int
    bytes: int
    sha256: Sha256


class Resume(_Entry):
    kind: Literal["resume"]
    round: int = Field(ge=0)
    """Rounds completed in the checkpoint the coordinator resumed from: later rounds' entries
    are superseded."""
    torn: Torn | None = None
    """A torn last line found on reopening, now in `<ledger>.torn`."""


Entry = Annotated[Union[Genesis, RoundEntry, RejectedEntry, Resume], Field(discriminator="kind")]
ENTRY: TypeAdapter[Entry] = TypeAdapter(Entry)


# --- hashing and keys -------------------------------------------------------------------------
def canonical(obj: Any) -> bytes:
    """The one JSON spelling of `obj` that is written, hashed and signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a tensor dict: per name in sorted order, its name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256(_TENSORS)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()  # (numel * itemsize,) native = little-endian
        h.update(canonical([name, str(t.dtype).removeprefix("torch."), list(t.shape), data.size]))
        h.update(data.data)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """`tensor_digest` of a safetensors file, as the checkpoint holds it."""
    from safetensors.torch import load_file

    return tensor_digest(load_file(path))


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The ledger key in `path` (PEM, PKCS#8); made once, with its public half beside it (.pub)."""
    if path.is_file():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise LedgerError(f"{path} is not a PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"{path} holds a {type(key).__name__}; the ledger key is Ed25519")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    # write_atomic's temp file is made 0600 by mkstemp, so the key is never readable by others
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    pub = path.with_suffix(".pub")
    write_atomic(pub, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pub.chmod(0o644)
    return key


def load_public_key(source: Path | str) -> Ed25519PublicKey:
    """A public key from a PEM file (ledger.pub) or the raw base64 the genesis entry holds."""
    try:
        text = (source.read_bytes() if isinstance(source, Path) else source.encode()).strip()
        key = serialization.load_pem_public_key(text) if b"-----BEGIN" in text else \
            Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except OSError as e:
        raise LedgerError(f"cannot read the public key {source}: {e.strerror or e}") from e
    except ValueError as e:
        raise LedgerError(f"{source} is not an Ed25519 public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{source} holds a {type(key).__name__}; the ledger key is Ed25519")
    return key


def raw_public_key(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw,
                                             serialization.PublicFormat.Raw)).decode()


def key_id(key: Ed25519PublicKey) -> str:
    """A short name for a key in messages."""
    return "ed25519:" + sha256(base64.b64decode(raw_public_key(key)))[:16]
