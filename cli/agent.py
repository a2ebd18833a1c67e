"""`fsl-edge agent`: what the edge agent container runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from fsl_edge.config_file import load_settings
from fsl_edge.edge_agent.settings import AgentSettings


def agent(
    config: Annotated[Optional[Path], typer.Option(help="YAML file of agent settings.")] = None,
    agent_id: Annotated[Optional[str], typer.Option("--id", help="This site's name.", envvar="FSL_AGENT_ID")] = None,
    data: Annotated[Optional[Path], typer.Option(help="The site's training file.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Local model (default: the coordinator's).")] = None,
    broker: Annotated[Optional[str], typer.Option(help="mqtt://host:port", envvar="FSL_BROKER")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="The run's name on the broker.")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Local state, to resume after a restart.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="The frozen prefix's activation cache (default: <workdir>/cache).")] = None,
    cache_bytes: Annotated[Optional[int], typer.Option(help="The most the activation cache keeps on disk.")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    """Run an edge agent: train this site's data with the federation; the data never leaves."""
    from fsl_edge.edge_agent.main import run_agent  # torch: only when the command runs

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    settings = load_settings(AgentSettings, config, {
        "agent_id": agent_id, "data": data, "model": model, "workdir": workdir,
        "cache_dir": cache_dir, "cache_bytes": cache_bytes, "runtime": {"broker": broker, "run_id": run_id}})
    rounds = run_agent(settings)
    typer.echo(f"agent {settings.agent_id}: finished after round {rounds}")
