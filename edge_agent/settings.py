"""The edge agent's configuration: who it is, its local data, and how it reaches the broker."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fsl_edge.config import RuntimeSettings


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: str
    """This site's name on the broker (topics fsl/<run>/agent/<agent_id>/...)."""
    data: Path
    """The site's training file (.jsonl or .txt); it never leaves this machine."""
    model: str | None = None
    """A local copy of the base model; None uses the name the coordinator announces."""
    device: str = "auto"
    """Where the site's part runs: auto (the GPU when CUDA is present), cpu, cuda, cuda:N."""
    workdir: Path = Path("runs/agent")
    """Local state (optimizer, data position) saved after every round, to resume after a restart."""
    cache_dir: Path | None = None
    """The activation cache of the frozen prefix (when the run has one); None: <workdir>/cache.
    It survives restarts and is invalidated when the prefix changes."""
    cache_bytes: int = Field(1 << 30, ge=1 << 20)
    """The most the activation cache keeps on disk; least recently used entries go first."""
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
