"""The planner's settings: its candidates, the codecs it may give a node, and per-node pins.

Kept apart from `planner.py` (which needs the delay model and profiles) so that the run's
settings (`config.LearningSettings.planner`) can hold them without an import cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodecOption(_Strict):
    """A step codec the planner may give a node, with its measured (or configured) effect."""

    name: str
    ratio: float = Field(1.0, gt=0)
    """Raw bytes / wire bytes of activations and gradients (1: sent as is)."""
    bytes_per_s: float | None = Field(None, gt=0)
    """Encode + decode throughput over raw bytes; None: negligible."""
    adapter_ratio: float = Field(1.0, gt=0)
    """Raw bytes / wire bytes of the per-round adapter exchange."""


class Pin(_Strict):
    """Fix any of a node's choices by config; the planner chooses the rest. With the planner
    off, a pin alone sets the node's cut and rank (unset fields: the run's split and lora)."""

    front: int | None = Field(None, ge=1)
    """The cut a."""
    back: int | None = Field(None, ge=0)
    """u-shape: blocks after the trunk, L - b."""
    rank: int | None = Field(None, ge=1)
    """The node's site LoRA rank (the trunk keeps lora.rank)."""
    codec: str | None = None
    """For the planner's estimate only: every node's steps use the run's compression."""


class PlannerSettings(_Strict):
    """A cut and LoRA rank per node: chosen by the planner (`enabled`), or pinned per node."""

    enabled: bool = False
    """Plan every node's cut and rank from the profiles the agents measure at join (off: every
    node takes its pin, else the run's split and lora.rank)."""
    fronts: tuple[int, ...] | None = None
    """Candidate cuts a; None: 1 .. L - 2."""
    backs: tuple[int, ...] | None = None
    """u-shape candidates for L - b; None: 1 .. L - 2. Vanilla has none (b = L)."""
    ranks: tuple[int, ...] = (4, 8, 16)
    """Candidate site LoRA ranks (aggregated across ranks by fsl_edge.hetero)."""
    codecs: tuple[CodecOption, ...] = (CodecOption(name="lossless"),)
    """Step codecs a node may get, least lossy first; their ratios measured or configured."""
    memory_fraction: float = Field(0.9, gt=0, le=1)
    """Of a node's measured memory, what a plan may fill (the estimate is not exact)."""
    slack: float = Field(0.0, ge=0)
    """How far above the optimal makespan the nodes' preferences may take it (0.05: 5 %)."""
    pins: dict[str, Pin] = Field(default_factory=dict)
    """Per node id: choices fixed by config."""
    relink_every: int = Field(5, ge=0)
    """With `enabled`: each agent measures its link to the broker again every this many rounds
    (after its upload) and reports it with the next one; `fsl-edge status` shows it beside the
    link the plan was made from. The plan itself is made once. 0: only at join."""
