"""The coordinator's configuration: the run it leads and where it keeps its state."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fsl_edge.config import LearningSettings, RuntimeSettings


class CoordinatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "smollm2"
    """The base model, as `fsl-edge models` names it; every agent must hold the same one."""
    training: LearningSettings = Field(default_factory=LearningSettings)
    """Split, LoRA and optimisation settings, sent to every agent when it joins."""
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    device: str = "auto"
    """Where the trunk runs: auto (the GPU when CUDA is present), cpu, cuda, cuda:N."""
    min_agents: int = Field(1, ge=1)
    """Agents that must have joined before the first round starts (also after a restart)."""
    max_agents: int = Field(1000, ge=1)
    """Agents the registry accepts; further HELLOs are refused (bounds memory and rounds)."""
    quorum: int = Field(1, ge=1)
    """Agents that must be online for a later round to start."""
    require_auth: bool | None = None
    """Drop messages that are not signed. None: true whenever node keys are configured
    (FSL_NODE_KEYS_DIR and the coordinator's signing key); false lets unsigned agents in while
    signed messages are still checked, for moving a federation to keys only."""
    checkpoint_dir: Path = Path("runs/coordinator")
    """Checkpoints after every round; started again on this folder, the coordinator resumes."""
    status_host: str = "127.0.0.1"
    status_port: int = Field(8780, ge=0, le=65535)
    """The HTTP status API (/status, /metrics, /healthz, /readyz); 0 picks a free port."""

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed: the model and the training settings."""
        return {"model": self.model, "training": self.training.model_dump(mode="json")}
