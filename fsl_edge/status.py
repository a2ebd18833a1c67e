"""The status document the coordinator serves at /status and `fsl-edge status` shows.

One schema for producer and consumer, so the CLI never guesses at field names. Byte counts are
what was published (after compression) and what the same tensors weigh uncompressed.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field


class Traffic(BaseModel):
    messages: int = 0
    bytes: int = 0
    """Payload bytes as published (after the codec)."""
    raw_bytes: int = 0
    """The same tensors uncompressed: the ratio raw_bytes / bytes is the compression."""

    def add(self, sent: int, raw: int, messages: int = 1) -> None:
        self.messages += messages
        self.bytes += sent
        self.raw_bytes += raw


class AgentStatus(BaseModel):
    state: str = "offline"
    """online (connected, idle), training, offline (last will or heartbeat lost), dropped."""
    last_seen: float | None = None
    """Unix time of the last message from this agent."""
    round: int = 0
    step: int = 0
    loss: float | None = None
    """Mean training loss of the agent's last completed round (or the running round)."""
    tokens: int = 0
    """Tokens trained on, whole run."""
    tokens_per_s: float | None = None
    rounds_contributed: int = 0
    updates_flagged: int = 0
    """Of its adapter updates, those the screening flagged (non-finite, or a norm out of bounds:
    rejected, or clipped under `rule: norm-clip`), whole run."""
    traffic: dict[str, Traffic] = Field(default_factory=dict)
    """Per message kind, both directions between this agent and the coordinator."""
    layers: list[tuple[int, list[int]]] = Field(default_factory=list)
    """Layer selection at this site: (epoch, the LoRA blocks trainable in it), latest last."""
    prefix_backend: str | None = None
    """What computes the site's frozen prefix: torch, or onnxruntime with the provider it really
    uses (it falls back to the CPU silently); None before the first frozen-prefix step."""
    cache: dict[str, float] = Field(default_factory=dict)
    """The site's prefix activation cache: hits, misses, corrupt, evictions, entries, bytes,
    hit_rate (empty without a frozen prefix)."""


class WorkerStatus(BaseModel):
    """A split-server worker (training.split.server 'per-site'), as the coordinator hears it."""

    last_seen: float | None = None
    """Unix time of its last message."""
    copies: int = 0
    """Sites' trunk copies it sent that closed a round (one per site and round it served)."""
    sites: list[str] = Field(default_factory=list)
    """The sites whose copies it sent in the last round it served."""


class RoundRecord(BaseModel):
    round: int
    participants: list[str]
    """Agents whose adapter was averaged into this round's result."""
    train_loss: float | None = None
    """Mean training loss of the round, weighted by the tokens each participant trained on."""
    site_loss: dict[str, float] = Field(default_factory=dict)
    """Each participant's mean training loss over its steps of the round."""
    heldout_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    traffic: dict[str, Traffic] = Field(default_factory=dict)
    """Per message kind, every agent, from this round's start to its close."""

    @computed_field
    @property
    def wire_bytes(self) -> int:
        return sum(t.bytes for t in self.traffic.values())

    @computed_field
    @property
    def raw_bytes(self) -> int:
        return sum(t.raw_bytes for t in self.traffic.values())


class Status(BaseModel):
    run: str
    state: str = "starting"
    """starting, waiting (for agents), training, finished, failed."""
    round: int = 0
    rounds: int = 0
    step: int = 0
    steps: int = 0
    model: str = ""
    mode: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    agents: dict[str, AgentStatus] = Field(default_factory=dict)
    traffic: dict[str, Traffic] = Field(default_factory=dict)
    """Per message kind, all agents."""
    history: list[RoundRecord] = Field(default_factory=list)
    rejected: dict[str, int] = Field(default_factory=dict)
    """Messages dropped, by reason: malformed, version, unknown_agent, bad_shape, non_finite,
    duplicate, wrong_run, late, bad_profile (a HELLO's profile: the agent stays, unplanned);
    unsigned, forged, replayed, unknown_node (authentication); rejected, clipped (screened updates); overflow, evicted, queue_full, overload (a resource
    bound, `runtime.bounds`)."""
    checkpoint: str | None = None
    """Directory of the last checkpoint."""
    layers: list[tuple[int, list[int]]] = Field(default_factory=list)
    """Layer selection in the trunk: (epoch, the LoRA blocks trainable in it), latest last."""
    prefix_store: dict[str, int] = Field(default_factory=dict)
    """Sites' prefix activations the server keeps (send_keys): entries, bytes, hits, misses."""
    planner: dict | None = None
    """With `planner.enabled`, once the first round's agents are planned (else None): the plan
    (`planner.Plan` as JSON), each node's entry with its predicted seconds per step (`step_s`)
    and `measured_step_s`, its last round as the coordinator saw it (start to upload, per step)."""
    workers: dict[str, WorkerStatus] = Field(default_factory=dict)
    """Split-server workers by id (training.split.server 'per-site'); empty otherwise."""

    @computed_field
    @property
    def compression_ratio(self) -> float | None:
        sent = sum(t.bytes for t in self.traffic.values())
        raw = sum(t.raw_bytes for t in self.traffic.values())
        return raw / sent if sent else None


def direction(kind: str) -> str | None:
    """Return "up" (agent to coordinator) or "down" for a kind such as "activation_up", else None."""
    # Kinds carry their direction as a suffix (fsl_edge.messages): one rule for every reader.
    head, _, way = kind.rpartition("_")
    return way if head and way in ("up", "down") else None
