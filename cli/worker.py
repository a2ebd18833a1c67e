"""`fsl-edge worker`: what a split-server worker container runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fsl_edge.config_file import load_settings
from fsl_edge.coordinator.settings import CoordinatorSettings


def worker(
    config: Annotated[Optional[Path], typer.Option(help="YAML file of coordinator settings (the coordinator's own).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (default smollm2).")] = None,
    broker: Annotated[Optional[str], typer.Option(help="mqtt://host:port", envvar="FSL_BROKER")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="The run's name on the broker.")] = None,
    worker_id: Annotated[Optional[str], typer.Option(help="This worker's name (default: the host's).", envvar="FSL_WORKER_ID")] = None,
    until_finished: Annotated[bool, typer.Option(help="Exit when the run finishes (local runs; a Deployment's workers keep serving).")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run a split-server worker: serve sites' trunk steps for a run with training.split.server
    'per-site'; start as many as the load needs."""
    from fsl_edge.split_worker.main import default_worker_id, run_worker  # torch: only when run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    settings = load_settings(CoordinatorSettings, config, {
        "model": model, "runtime": {"broker": broker, "run_id": run_id}})
    served = run_worker(settings, worker_id or default_worker_id(), until_finished=until_finished)
    typer.echo(f"worker served {served} steps of run {settings.runtime.run_id}")
