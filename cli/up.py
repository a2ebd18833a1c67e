"""`fsl-edge up`: a whole federation on this machine, with progress and a final summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings, Policy,
                             PrefixSettings, Preset, SelectionSettings,
                             RuntimeSettings, ServerCopies, SplitMode, SplitSettings, TrainSettings)
from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.errors import ConfigError

from .federation import Federation, prepare


def up(
    agents: Annotated[int, typer.Option(help="Agents (sites) to run; one per data shard.")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 2,
    steps: Annotated[int, typer.Option(help="Local steps per agent per round.")] = 5,
    model: Annotated[str, typer.Option(help="Base model: bundled name, folder, .gguf, tiny-random-<family>.")] = "smollm2",
    data: Annotated[Optional[Path], typer.Option(help="Folder of site-*.jsonl (default: the ICD-10 demo).")] = None,
    workdir: Annotated[Path, typer.Option(help="Logs, checkpoints and agent state.")] = Path("runs/up"),
    broker: Annotated[Optional[str], typer.Option(help="Use this broker (mqtt://host:port) instead of starting one.")] = None,
    embedded: Annotated[bool, typer.Option(help="Start the embedded amqtt broker even if mosquitto is installed.")] = False,
    mode: Annotated[SplitMode, typer.Option(help="u-shape keeps labels at the sites.")] = SplitMode.U_SHAPE,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 4,
    max_len: Annotated[int, typer.Option(help="Tokens per sample.")] = 48,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    eval_samples: Annotated[int, typer.Option(help="Held-out samples per site for before/after.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for everything.")] = 0,
    compression: Annotated[Preset, typer.Option(help="What travels on the wire: none (fp32), lossless, balanced (about 10x fewer bytes), aggressive; see BENCHMARKS.md.")] = Preset.LOSSLESS,
    frozen_prefix: Annotated[int, typer.Option(help="Site blocks from the front without LoRA; their outputs are cached on disk (at most the cut).")] = 0,
    send_keys: Annotated[bool, typer.Option(help="With --frozen-prefix = the cut: send sample keys once the server holds a sample's prefix activation (keeps them on the server).")] = False,
    layers: Annotated[Policy, typer.Option(help="Which LoRA blocks train each epoch: all, topk-gradnorm, freeze-front, random.")] = Policy.ALL,
    workers: Annotated[int, typer.Option(help="Split-server workers: with 1 or more, each site trains its own trunk copy (split.server per-site) and the workers serve the trunk; 0: the coordinator serves one shared copy.")] = 0,
) -> None:
    """Run a federation on this machine: broker, coordinator and agents, then a summary."""
    from fsl_edge.runs import ensure_demo_data
    from fsl_edge.sites import site_files

    console = Console()
    data_dir = data or ensure_demo_data(workdir / "data")
    names = list(site_files(data_dir))
    if agents > len(names):
        raise ConfigError(f"{agents} agents asked for, but {data_dir} has {len(names)} sites "
                          f"({', '.join(names)})")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: give 0 or more")
    if workers and embedded:
        raise ConfigError("--workers needs a broker with shared subscriptions (Mosquitto); the "
                          "embedded amqtt has none: drop --embedded")
    training = LearningSettings(
        split=SplitSettings(mode=mode, server=ServerCopies.PER_SITE if workers else ServerCopies.SHARED),
        lora=LoraSettings(),
        train=TrainSettings(rounds=rounds, steps=steps, batch_size=batch_size, max_len=max_len,
                            lr=lr, seed=seed),
        compression=CompressionSettings(preset=compression),
        prefix=PrefixSettings(frozen=frozen_prefix, send_keys=send_keys),
        selection=SelectionSettings(policy=layers))
    settings = CoordinatorSettings(model=model, training=training, runtime=RuntimeSettings(
        run_id=f"up-{int(time.time())}", resend_s=30.0, offline_after_s=60.0), status_port=0)
    fed = prepare(workdir, settings, names[:agents], data_dir, broker, embedded)
    fed.workers = workers
    if workers and fed.broker is not None and fed.broker.name == "amqtt":
        fed.stop()
        raise ConfigError("--workers needs Mosquitto (shared subscriptions); only the embedded "
                          "amqtt was found: install mosquitto")
    console.print(f"broker: {fed.broker.name + ' at ' + fed.broker.url if fed.broker else broker}"
                  + ("" if fed.broker is None or fed.broker.name == "amqtt"
                     else " (local mosquitto found; --embedded uses amqtt)")
                  + f"\nmodel {model}, {agents} agents: {', '.join(fed.sites)}"
                  + (f", {workers} split-server workers" if workers else "") + "; "
                  f"MQTT on loopback in the clear (deployments use TLS), messages signed with keys "
                  f"made for this run; logs in {workdir / 'logs'}")
    started = time.monotonic()
    try:
        fed.start()
        final = _follow(fed, console)
    except KeyboardInterrupt:
        console.print("stopping every process ...")
        raise
    finally:
        fed.stop()
    _summary(fed, final, data_dir, eval_samples, time.monotonic() - started, console)


def _follow(fed: Federation, console: Console):
    """Progress bars from the coordinator's status API until the coordinator exits."""
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    last = None
    with Progress(*columns, console=console) as progress:
        rounds = progress.add_task("rounds", total=fed.settings.training.train.rounds, note="starting")
        per_agent = {a: progress.add_task(f"  {a}", total=fed.settings.training.train.steps, note="")
                     for a in fed.sites}
        while not fed.coordinator_done():
            fed.check()
            status = fed.status()
            if status is not None:
                last = status
                progress.update(rounds, completed=len(status.history), note=status.state)
                for agent, task in per_agent.items():
                    st = status.agents.get(agent)
                    if st is None:
                        continue
                    done = fed.settings.training.train.steps if st.round < status.round or \
                        st.state == "online" and st.round == status.round and status.history \
                        and status.history[-1].round == status.round else st.step
                    loss = f"loss {st.loss:.3f}" if st.loss is not None else ""
                    progress.update(task, completed=done, note=f"{st.state} {loss}")
            time.sleep(0.5)
        final = fed.final_status() or last
        if final is not None:  # the coordinator has exited: show where it ended
            progress.update(rounds, completed=len(final.history), note=final.state)
            done = set(final.history[-1].participants) if final.history else set()
            for agent, task in per_agent.items():
                if agent in done:
                    progress.update(task, completed=fed.settings.training.train.steps,
                                    note="done")
    fed.wait(timeout=60)
    fed.check()
    return final


def _summary(fed: Federation, final, data_dir: Path, eval_samples: int, seconds: float,
             console: Console) -> None:
    from fsl_edge.data import pad_id_of
    from fsl_edge.evaluate import heldout_before_after, load_result
    from fsl_edge.models import load
    from fsl_edge.report.heldout import Heldout, save_heldout
    from fsl_edge.sites import load_sites

    latest = fed.checkpoint_dir / (fed.checkpoint_dir / "LATEST").read_text().strip()
    settings = fed.settings.training
    loaded = load(fed.settings.model)
    sites = load_sites(data_dir, loaded.tokenizer, settings.train.max_len, fed.sites)
    for s in sites:
        s.heldout = s.heldout[:eval_samples]
    console.print("evaluating held-out loss before and after ...")
    (per_b, all_b), (per_a, all_a) = heldout_before_after(
        loaded.model, sites, settings, pad_id_of(loaded.tokenizer), *load_result(latest))
    save_heldout(fed.checkpoint_dir, Heldout(before=per_b, after=per_a, overall_before=all_b,
                                             overall_after=all_a, samples=eval_samples))
    table = Table("held-out loss", *fed.sites, "all", title="fsl-edge up: summary")
    table.add_row("base model", *(f"{per_b[s]:.4f}" for s in fed.sites), f"{all_b:.4f}")
    table.add_row("after federation", *(f"{per_a[s]:.4f}" for s in fed.sites), f"{all_a:.4f}")
    console.print(table)
    if final is not None:
        sent = sum(t.bytes for t in final.traffic.values())
        raw = sum(t.raw_bytes for t in final.traffic.values())
        console.print(f"traffic: {sent / 2**20:.1f} MiB on the wire ({raw / 2**20:.1f} MiB of "
                      f"tensors); " + ", ".join(f"{k} {t.bytes / 2**20:.1f}"
                                                for k, t in final.traffic.items() if t.bytes > 2**16))
    console.print(f"time: {seconds:.0f} s; checkpoint: {latest}\n"
                  f"adapters: {latest / 'site_adapter.safetensors'} (sites), "
                  f"{latest / 'server_adapter.safetensors'} (trunk)")
