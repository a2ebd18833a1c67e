"""`fsl-edge deploy`: the coordinator and its broker into a Kubernetes cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from fsl_edge.deploy import deploy as run_deploy
from fsl_edge.deploy import load_deploy_settings
from fsl_edge.deploy.render import to_yaml


def deploy(
    config: Annotated[Optional[Path], typer.Option(help="YAML deployment config (FSL_ variables override it).")] = None,
    context: Annotated[Optional[str], typer.Option(help="kubeconfig context (default: the current one).")] = None,
    kubeconfig: Annotated[Optional[Path], typer.Option(help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Namespace (default fsl-edge).")] = None,
    gpus: Annotated[Optional[int], typer.Option(help="GPUs for the coordinator; 0 runs it on CPU.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the manifests; contact no cluster.")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Write the manifests into this folder (GitOps); no cluster.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until the coordinator and the broker are ready.")] = True,
) -> None:
    """Render k8s/ with the deployment config and apply it with server-side apply."""
    settings = load_deploy_settings(config, {"context": context, "kubeconfig": kubeconfig,
                                             "namespace": namespace, "gpus": gpus})
    console = Console(stderr=True, soft_wrap=True)
    result = run_deploy(settings, dry_run=dry_run, output=output, wait=wait, console=console)
    if dry_run:
        typer.echo(to_yaml(result.objects), nl=False)
        return
    if output is not None:
        console.print(f"wrote {len(result.objects)} manifests and a kustomization.yaml to "
                      f"[bold]{escape(str(output))}[/]; the Secrets the pods mount are not among "
                      "them (`fsl-edge deploy` creates them, see the README)")
        return
    for note in result.notes:
        console.print(f"- {escape(note)}")
    console.print(f"applied {len(result.applied)} objects to namespace [bold]{settings.namespace}[/] "
                  f"in context [bold]{escape(result.context or '')}[/] ({result.server_version})")
    where = f"[bold]{result.endpoint}[/]" if result.endpoint else escape(result.endpoint_hint)
    console.print(f"sites connect to the broker at {where}"
                  + (f" ({escape(result.endpoint_hint)})" if result.endpoint and result.endpoint_hint else ""))
    flags = "".join(f" --{k} {escape(str(v))}" for k, v in
                    (("config", config), ("context", context), ("namespace", namespace)) if v)
    console.print(f"enroll a site: [bold]fsl-edge enroll NAME{flags}[/] (writes the bundle it "
                  "runs with `docker compose up`)")
