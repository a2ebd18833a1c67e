"""The `fsl-edge` command: wiring only. Each sub-command lives in its own module.

This is the one place where fsl-edge's errors become messages and exit codes.
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
try:  # typer >= 0.29 vendors click here; older typers (flwr, the `bench` extra, pins < 0.21) use click
    from typer._click.exceptions import ClickException
except ImportError:
    from click.exceptions import ClickException

from fsl_edge.config_file import settings_error
from fsl_edge.errors import FslError

from . import agent, audit, coordinator, data, deploy, enroll, models, simulate, status, up
from . import report
from . import eval as eval_cmd, export, worker

app = typer.Typer(name="fsl-edge", no_args_is_help=True, add_completion=False,
                  help="Split federated fine-tuning of LLMs with LoRA, at the edge.")
app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.add_typer(audit.app, name="audit")
app.command("simulate")(simulate.simulate)
app.command("status")(status.status)
app.command("coordinator")(coordinator.coordinator)
app.command("worker")(worker.worker)
app.command("agent")(agent.agent)
app.command("up")(up.up)
app.command("deploy")(deploy.deploy)
app.command("enroll")(enroll.enroll)
app.command("revoke")(enroll.revoke)
app.command("nodes")(enroll.nodes)
app.command("report")(report.report)
app.command("eval")(eval_cmd.eval_)
app.command("export")(export.export)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map fsl-edge errors to one clear line and the error's exit code."""
    err = Console(stderr=True, soft_wrap=True)  # one line per error, whatever the width
    try:
        app(args=argv, prog_name="fsl-edge", standalone_mode=False)
    except (FslError, ValidationError) as e:
        error = settings_error(e) if isinstance(e, ValidationError) else e
        err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        return error.exit_code
    except typer.Exit as e:
        return e.exit_code
    except ClickException as e:
        e.show()
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
