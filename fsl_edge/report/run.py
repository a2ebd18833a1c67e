"""What a report shows, as one `Run` whatever wrote the folder (fsl_edge.report.sources reads it).

A figure the folder does not record is None or empty, and the report says so: an unknown value
drawn as 0 would be a false line on a plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsl_edge.ledger import Contribution

from .heldout import Heldout


@dataclass
class Flow:
    """Traffic of one message kind."""

    bytes: int = 0
    """Payload bytes as published (after the codec)."""
    raw: int | None = None
    """The same tensors uncompressed; None where the run does not record it."""
    messages: int | None = None

    @property
    def ratio(self) -> float | None:
        return self.raw / self.bytes if self.raw and self.bytes else None


@dataclass
class Round:
    round: int
    participants: list[str]
    train_loss: float | None = None
    """Token-weighted over the participants."""
    heldout_loss: float | None = None
    """Token-weighted over every site's held-out data."""
    site_train_loss: dict[str, float] = field(default_factory=dict)
    site_heldout_loss: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    """Per site, where the run records it (else the round's total under "all")."""
    seconds: float = 0.0
    traffic: dict[str, Flow] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    """The sites' activation cache this round, all sites: hits, misses."""
    layers: dict[str, list[int]] = field(default_factory=dict)
    """Party (a site or "server") -> its LoRA blocks trainable at the round's end."""


@dataclass
class Site:
    name: str
    state: str | None = None
    tokens: int = 0
    last_loss: float | None = None
    """Mean training loss of the site's last round (what a run that predates per-site round
    records still shows)."""
    last_round: int | None = None
    cache: dict[str, float] = field(default_factory=dict)
    """hits, misses, entries, bytes, hit_rate, ... (empty without a frozen prefix)."""
    layers: list[tuple[int, list[int]]] = field(default_factory=list)
    """(epoch, trainable blocks), latest last."""
    prefix_backend: str | None = None


@dataclass
class LedgerSummary:
    ok: bool
    entries: int
    rounds: int
    key: str
    pinned: bool
    checkpoints: list[str]
    """Checkpoint folders whose adapters match the ledger."""
    problems: list[str]
    contributions: dict[str, Contribution]
    rejections: list[tuple[int, str, str]]
    """(round, agent, reason) of every update the run refused."""


@dataclass
class Run:
    kind: str
    """"coordinator" (its checkpoint folder, from `fsl-edge up` or a deployment) or "simulate"
    (the --out folder of `fsl-edge simulate`)."""
    folder: Path
    name: str
    model: str = ""
    mode: str = ""
    state: str = ""
    rounds_planned: int = 0
    rounds: list[Round] = field(default_factory=list)
    """Completed rounds, from round 1."""
    heldout: Heldout | None = None
    sites: dict[str, Site] = field(default_factory=dict)
    traffic: dict[str, Flow] = field(default_factory=dict)
    """Whole run, per message kind."""
    rejected_messages: dict[str, int] = field(default_factory=dict)
    """Messages dropped on the wire, by reason."""
    trunk_layers: list[tuple[int, list[int]]] = field(default_factory=list)
    prefix_store: dict[str, int] = field(default_factory=dict)
    planner: Any = None
    """What the run's planner chose, as the run recorded it (None: no planner)."""
    workers: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    """Split-server workers (split.server per-site): id -> (sites' copies sent, the sites of
    its last round)."""
    ledger: LedgerSummary | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """The training settings (LearningSettings as JSON), where the folder holds them."""

    @property
    def site_names(self) -> list[str]:
        names = set(self.sites) | {p for r in self.rounds for p in r.participants}
        if self.heldout:
            names |= set(self.heldout.before) | set(self.heldout.after)
        return sorted(names)

    @property
    def compression_ratio(self) -> float | None:
        """Raw tensor bytes / payload bytes over every message, as `fsl-edge status` shows it."""
        if any(f.raw is None for f in self.traffic.values()):
            return None
        sent = sum(f.bytes for f in self.traffic.values())
        return sum(f.raw or 0 for f in self.traffic.values()) / sent if sent else None
