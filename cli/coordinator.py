"""`fsl-edge coordinator`: what the coordinator container runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fsl_edge.config_file import load_settings
from fsl_edge.coordinator.settings import CoordinatorSettings


def coordinator(
    config: Annotated[Optional[Path], typer.Option(help="YAML file of coordinator settings.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (default smollm2).")] = None,
    broker: Annotated[Optional[str], typer.Option(help="mqtt://host:port", envvar="FSL_BROKER")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="The run's name on the broker.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Local steps per round.")] = None,
    min_agents: Annotated[Optional[int], typer.Option(help="Agents needed before round 1.")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Checkpoints; resumes from here.")] = None,
    status_port: Annotated[Optional[int], typer.Option(help="HTTP status API port.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run the coordinator: split server, aggregator, checkpoints and status API."""
    from fsl_edge.coordinator.main import run_coordinator  # torch: only when the command runs

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    settings = load_settings(CoordinatorSettings, config, {
        "model": model, "min_agents": min_agents, "checkpoint_dir": checkpoint_dir,
        "status_port": status_port, "runtime": {"broker": broker, "run_id": run_id},
        "training": {"train": {"rounds": rounds, "steps": steps}}})
    status = run_coordinator(settings)
    typer.echo(f"run {status.run} {status.state} after round {status.round}; "
               f"checkpoint in {settings.checkpoint_dir}")
