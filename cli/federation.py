"""A whole federation on one machine: a broker, the coordinator and N agents as processes.

This is what `fsl-edge up` runs. Each process is the real `fsl-edge coordinator` / `fsl-edge
agent` command, talking through a real broker, so a local run exercises everything a deployed
one does except the network between sites. Messages are signed with keys made for the run, as
an enrolled federation's are (the coordinator reads the node keys from <workdir>/keys, a folder
laid out like `fsl-edge enroll --local`'s). Logs go to <workdir>/logs/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fsl_edge import auth
from fsl_edge.atomic import write_atomic
from fsl_edge.broker import BrokerProcess, free_port, local_broker
from fsl_edge.config_file import dump_settings
from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.errors import TemporaryError
from fsl_edge.status import Status


# Keys and broker logins a process must not inherit from the shell: the run's own (or none)
# are passed explicitly.
_AUTH_ENV = (auth.NODE_KEY_ENV, auth.COORDINATOR_PUBKEY_ENV, auth.NODE_KEYS_DIR_ENV, auth.SIGNING_KEY_ENV,
             *(f"FSL_MQTT_{k}" for k in ("USERNAME", "PASSWORD", "CA_FILE", "CERT_FILE", "KEY_FILE")))


@dataclass(frozen=True)
class LocalKeys:
    """Every message key of a federation on one machine, made for the run."""

    signing_key: str = field(repr=False)
    """The coordinator's (base64 Ed25519 private key)."""
    node_keys: dict[str, str] = field(repr=False)
    """Site -> its node key (base64)."""

    @classmethod
    def generate(cls, sites: list[str]) -> LocalKeys:
        return cls(auth.new_signing_key(), {site: auth.new_node_key() for site in sites})

    def coordinator_env(self, folder: Path) -> dict[str, str]:
        """Write the node keys where the coordinator reads them; its environment."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(folder / auth.NODE_KEYS_JSON, json.dumps(self.node_keys, indent=1))  # 0600
        return {auth.NODE_KEYS_DIR_ENV: str(folder), auth.SIGNING_KEY_ENV: self.signing_key}

    def agent_env(self, site: str) -> dict[str, str]:
        return {auth.NODE_KEY_ENV: self.node_keys[site],
                auth.COORDINATOR_PUBKEY_ENV: auth.public_key_of(self.signing_key)}


@dataclass
class Federation:
    workdir: Path
    settings: CoordinatorSettings
    sites: list[str]
    data_dir: Path
    broker: BrokerProcess | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    status_url: str = ""
    agent_wrap: Callable[[list[str]], list[str]] | None = None
    """Runs each agent inside something (a network namespace: `ip netns exec ...`)."""
    agent_broker: str | None = None
    """The broker's address as the agents reach it, when not the coordinator's."""
    wrapped_sites: set[str] | None = None
    """The sites agent_wrap and agent_broker apply to; None: every site."""
    keys: LocalKeys | None = None
    """The run's message keys; None: nothing is signed or checked."""
    workers: int = 0
    """Split-server workers to start (training.split.server 'per-site' runs need one or more)."""
    broker_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """"coordinator" or a site -> its broker login (FSL_MQTT_*), as a deployment's Secret or a
    site bundle's agent.env gives it; none: the broker admits anyone (`fsl-edge up`)."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.settings.checkpoint_dir

    def _spawn(self, name: str, args: list[str], wrap=None, keys: dict[str, str] | None = None) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "fsl_edge.cli.app", *args]
        inherited = {k: v for k, v in os.environ.items() if k not in _AUTH_ENV}
        with open(logs / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                wrap(argv) if wrap else argv, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={"OMP_NUM_THREADS": str(self.threads), **inherited, "PYTHONUNBUFFERED": "1",
                     **(keys or {})})

    @property
    def threads(self) -> int:
        # N+1 processes share this machine's cores: oversubscribed torch threads cost far more
        # than they give (10-30x slower on 2 cores)
        return max(1, (os.cpu_count() or 1) // (len(self.sites) + self.workers + 1))

    def start(self) -> None:
        self.start_coordinator()
        for i in range(self.workers):
            self.start_worker(f"w{i}")
        for name in self.sites:
            self.start_agent(name)

    def start_coordinator(self) -> None:
        """Start (or restart: it resumes from its checkpoint folder) the coordinator."""
        config = self.workdir / "coordinator.yaml"
        dump_settings(self.settings, config)
        self.status_url = f"http://{self.settings.status_host}:{self.settings.status_port}"
        keys = self.keys.coordinator_env(self.workdir / "keys") if self.keys else {}
        self._spawn("coordinator", ["coordinator", "--config", str(config)],
                    keys={**keys, **self.broker_env.get("coordinator", {})})

    def start_worker(self, worker_id: str) -> None:
        """Start a split-server worker; it exits when the run finishes."""
        keys = self.keys.coordinator_env(self.workdir / "keys") if self.keys else {}
        self._spawn(f"worker-{worker_id}", [
            "worker", "--config", str(self.workdir / "coordinator.yaml"), "--worker-id", worker_id,
            "--until-finished"], keys={**keys, **self.broker_env.get("worker", {})})

    def start_agent(self, name: str) -> None:
        """Start (or restart: it resumes from its own state) the agent of site `name`."""
        from fsl_edge.sites import site_files
        rt = self.settings.runtime
        wrapped = self.wrapped_sites is None or name in self.wrapped_sites
        self._spawn(f"agent-{name}", [
            "agent", "--id", name, "--data", str(site_files(self.data_dir)[name][0]),
            "--broker", (self.agent_broker if wrapped else None) or rt.broker, "--run-id", rt.run_id,
            "--workdir", str(self.workdir / "agents" / name)], self.agent_wrap if wrapped else None,
            {**(self.keys.agent_env(name) if self.keys else {}), **self.broker_env.get(name, {})})

    def status(self) -> Status | None:
        """The coordinator's status, or None while it is not serving yet."""
        try:
            with urllib.request.urlopen(self.status_url + "/status", timeout=2) as r:
                return Status.model_validate(json.loads(r.read()))
        except (OSError, ValueError):
            return None

    def final_status(self) -> Status | None:
        """The status the coordinator left beside its checkpoints when it finished."""
        path = self.checkpoint_dir / "status.json"
        return Status.model_validate_json(path.read_text()) if path.is_file() else None

    def check(self) -> None:
        """Raise if a process died with an error (an agent or the coordinator)."""
        for name, p in self.processes.items():
            code = p.poll()
            if code not in (None, 0):
                log = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")
                tail = "\n".join(log.strip().splitlines()[-5:])
                raise TemporaryError(f"{name} exited with code {code}; its log "
                                     f"({self.workdir / 'logs' / (name + '.log')}) ends:\n{tail}")

    def coordinator_done(self) -> bool:
        return self.processes["coordinator"].poll() is not None

    def wait(self, timeout: float) -> None:
        """Give every process `timeout` seconds to exit by itself (agents exit after ROUND_END)."""
        deadline = time.monotonic() + timeout
        for p in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every process to stop (SIGINT, like Ctrl-C), then kill what lingers."""
        for p in self.processes.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for p in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.broker:
            self.broker.stop()


def prepare(workdir: Path, settings: CoordinatorSettings, sites: list[str], data_dir: Path,
            broker_url: str | None, embedded: bool, signed: bool = True) -> Federation:
    """Clear the previous run's state, start a broker unless one is given, fill in addresses;
    `signed`: make message keys for the coordinator and every site."""
    for stale in (workdir / "checkpoints", workdir / "agents", workdir / "logs", workdir / "keys"):
        shutil.rmtree(stale, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = None
    if broker_url is None:
        broker = local_broker(workdir / "broker", prefer_mosquitto=not embedded).start()
        broker_url = broker.url
    settings = settings.model_copy(update={
        "runtime": settings.runtime.model_copy(update={"broker": broker_url}),
        "checkpoint_dir": workdir / "checkpoints", "min_agents": len(sites),
        "status_port": settings.status_port or free_port()})
    return Federation(workdir, settings, sites, data_dir, broker,
                      keys=LocalKeys.generate(sites) if signed else None)
