"""The load test's federation: many agents against one coordinator through a real broker.

The coordinator is the real `fsl-edge coordinator` process: it is what is under test, and its
memory is sampled from /proc while it runs. The agents are the real `Agent` class, each with
its own MQTT connection, client id and signing key, but they run as threads of this process:
32 agent processes would each import torch (~300 MB and several CPU-seconds to start on a
2-core machine), about 10 GB and minutes of start-up that test nothing of the coordinator.
What threads give up is agent parallelism (they share one interpreter lock), so agents are
slower than processes would be; the coordinator sees the same clients, protocol and load.
Kept free of pytest so bench/load.py can use it too.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from fsl_edge import protocol
from fsl_edge.auth import agent_authenticator
from fsl_edge.cli.federation import Federation, prepare
from fsl_edge.config import (CompressionSettings, LearningSettings, LoraSettings, RuntimeSettings,
                             TrainSettings)
from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.edge_agent.agent import Agent
from fsl_edge.edge_agent.main import builder
from fsl_edge.edge_agent.settings import AgentSettings
from fsl_edge.icd10_data import build_icd10
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.status import Status
from fsl_edge.transport import MqttLink

from .runtime_harness import MODEL, finish, wait_for

REPLIES = (MessageKind.ACTIVATION_DOWN, MessageKind.GRADIENT_DOWN)


def load_data(folder: Path, agents: int, per_agent: int) -> Path:
    """`agents` site files dealt from two ICD-10 chapters (there are fewer chapters than agents)."""
    source = folder / "icd10"
    build_icd10(source, chapters=("circulatory", "neoplasms"), per_site=agents * per_agent // 2 + 1,
                heldout=4)
    lines = [line for name in ("circulatory", "neoplasms")
             for line in (source / f"site-{name}.jsonl").read_text().splitlines() if line]
    sites = folder / "sites"
    sites.mkdir(parents=True, exist_ok=True)
    for i in range(agents):
        (sites / f"site-{agent_name(i)}.jsonl").write_text("\n".join(lines[i::agents]) + "\n")
    return sites


def agent_name(i: int) -> str:
    return f"agent{i:02d}"


def load_federation(workdir: Path, broker_url: str, agents: int, rounds: int, steps: int) -> Federation:
    training = LearningSettings(
        lora=LoraSettings(rank=4), compression=CompressionSettings(preset="lossless"),
        train=TrainSettings(rounds=rounds, steps=steps, batch_size=4, max_len=32, lr=1e-2))
    # A grace long enough for a loaded 2-core machine: the test is of bounds and bookkeeping,
    # and an agent dropped for slowness would be a false failure, not a lost update.
    runtime = RuntimeSettings(run_id="load", broker=broker_url, heartbeat_s=1.0,
                              offline_after_s=60.0, resend_s=10.0)
    settings = CoordinatorSettings(model=MODEL, training=training, runtime=runtime, status_port=0)
    data = load_data(workdir / "data", agents, per_agent=steps * 4)
    return prepare(workdir / "fed", settings, [agent_name(i) for i in range(agents)], data,
                   broker_url, embedded=False, signed=True)


class LoadAgent(Agent):
    """An agent that keeps books: the uploads it sent and every step reply it received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uploads: dict[int, int] = {}  # round -> tokens it reported
        self.upload_sends = 0
        self.replies: Counter[tuple[str, int, int]] = Counter()  # (kind, round, step) -> received
        self.built_at: float | None = None
        self.result: int | None = None
        self.error: BaseException | None = None
        get = self.link.get

        def counted(timeout):
            received = get(timeout)
            if received is not None and received.envelope.kind in REPLIES:
                env = received.envelope
                self.replies[(env.kind.name, env.round, env.step)] += 1
            return received

        self.link.get = counted

    def send(self, env: Envelope) -> None:
        if env.kind is MessageKind.ADAPTER_UP:
            first = self.uploads.setdefault(env.round, env.meta["tokens"])
            assert first == env.meta["tokens"], f"round {env.round} uploaded twice, differently"
            self.upload_sends += 1
        super().send(env)


_building = threading.Lock()  # agents seed torch's one global RNG when they build: one at a time


def start_agents(fed: Federation) -> list[tuple[LoadAgent, threading.Thread]]:
    from fsl_edge.sites import site_files

    files, rt = site_files(fed.data_dir), fed.settings.runtime
    started = []
    for name in fed.sites:
        settings = AgentSettings(agent_id=name, data=files[name][0], workdir=fed.workdir / "agents" / name,
                                 runtime=rt)
        status = protocol.topic_status(rt.run_id, name)
        link = MqttLink(rt.broker, f"fsl-{rt.run_id}-{name}",
                        [protocol.topic_down(rt.run_id, name), protocol.topic_broadcast(rt.run_id)],
                        will=(status, protocol.STATUS_OFFLINE), online=(status, protocol.STATUS_ONLINE),
                        bounds=rt.bounds,
                        authenticator=agent_authenticator(name, fed.keys.agent_env(name)))
        agent = LoadAgent(settings, link, None)
        agent.build = lambda welcome, agent=agent, build=builder(settings): _build(agent, build, welcome)
        started.append((agent, threading.Thread(target=_run, args=(agent,), name=name, daemon=True)))
    for agent, thread in started:
        agent.link.start()
        thread.start()
    return started


def _build(agent: LoadAgent, build, welcome: dict):
    with _building:
        built = build(welcome)
    agent.built_at = time.monotonic()
    return built


def _run(agent: LoadAgent) -> None:
    try:
        agent.result = agent.run()
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        agent.error = e
    finally:
        agent.link.publish_status(protocol.topic_status(agent.run_id, agent.me), protocol.STATUS_OFFLINE)
        agent.link.stop()


class RssSampler(threading.Thread):
    """The coordinator's resident memory (from /proc), every `period` seconds until it exits."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True, name="rss")
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []  # (monotonic time, bytes)

    def run(self) -> None:
        while True:
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            rss = next((int(line.split()[1]) * 1024 for line in text.splitlines()
                        if line.startswith("VmRSS:")), None)
            if rss is None:  # a zombie: it has exited
                return
            self.samples.append((time.monotonic(), rss))
            time.sleep(self.period)


@dataclass
class LoadRun:
    fed: Federation
    agents: list[LoadAgent]
    started: float
    ended: float
    trained_from: float  # every agent built: the first round starts
    rss: list[tuple[float, int]]  # the coordinator's (monotonic time, resident bytes)
    status: Status

    def training_rss(self) -> list[int]:
        return [b for t, b in self.rss if self.trained_from <= t <= self.ended]

    def quarters(self) -> list[int]:
        """The coordinator's peak RSS in each quarter of the training time."""
        span = (self.ended - self.trained_from) / 4
        return [max((b for t, b in self.rss if self.trained_from + q * span <= t
                     <= self.trained_from + (q + 1) * span), default=0) for q in range(4)]


def run_load(workdir: Path, broker_url: str, agents: int, rounds: int, steps: int,
             timeout: float) -> LoadRun:
    """Run the federation to its end; raise if an agent or the coordinator failed."""
    fed = load_federation(workdir, broker_url, agents, rounds, steps)
    started = time.monotonic()
    fed.start_coordinator()
    sampler = RssSampler(fed.processes["coordinator"].pid)
    sampler.start()
    pairs = []
    try:
        pairs = start_agents(fed)
        wait_for(lambda: fed.coordinator_done() or any(a.error for a, _ in pairs), timeout,
                 "the load run to finish", fed)
        errors = {a.me: repr(a.error) for a, _ in pairs if a.error}
        assert not errors, errors
        status = finish(fed, timeout=60)
        for _, thread in pairs:
            thread.join(60)
    finally:
        fed.stop()
        for agent, thread in pairs:
            agent._stop.set()  # a thread still waiting (a failed run): let it go
    sampler.join(5)
    ended = max((t for t, _ in sampler.samples), default=time.monotonic())  # the coordinator exited
    return LoadRun(fed, [a for a, _ in pairs], started, ended,
                   max(a.built_at or started for a, _ in pairs), sampler.samples, status)


def trunk_steps(fed: Federation) -> set[int]:
    """The optimizer steps every trunk LoRA weight took, from the last checkpoint."""
    latest = fed.checkpoint_dir / (fed.checkpoint_dir / "LATEST").read_text().strip()
    state = load_file(latest / "server_optimizer.safetensors")
    return {int(v.item()) for k, v in state.items() if k.endswith(".step")}


def agent_steps(agent: LoadAgent) -> set[int]:
    return {int(s["step"]) for s in agent.part.optimizer.state.values()}


@dataclass
class Accounts:
    """What was applied against what was sent: `lost` and `duplicated` count updates (trunk
    and site optimizer steps, round uploads) missing or applied more than once."""

    lost: int = 0
    duplicated: int = 0
    answered_again: int = 0
    """Step replies an agent received more than once: answers to its resends, not applied."""
    upload_sends: int = 0
    problems: list[str] = field(default_factory=list)

    def compare(self, what: str, applied: int, expected: int) -> None:
        if applied != expected:
            self.problems.append(f"{what}: {applied} applied, {expected} expected")
        self.lost += max(0, expected - applied)
        self.duplicated += max(0, applied - expected)


def account(run: LoadRun) -> Accounts:
    """Check every update of the run was applied exactly once, on the coordinator, the agents
    and the ledger."""
    from fsl_edge.audit import verify

    fed, status, books = run.fed, run.status, Accounts()
    train = fed.settings.training.train
    names = sorted(a.me for a in run.agents)
    for steps in trunk_steps(fed):
        books.compare("trunk optimizer steps", steps, len(names) * train.rounds * train.steps)
    ledger = verify(fed.checkpoint_dir / "ledger.jsonl", fed.checkpoint_dir)
    books.problems += [str(p) for p in ledger.problems]
    books.compare("rounds on the ledger", ledger.rounds, train.rounds)
    on_ledger = ledger.contributions()
    for agent in run.agents:
        sent = sum(agent.uploads.values())
        books.upload_sends += agent.upload_sends
        for steps in agent_steps(agent):
            books.compare(f"{agent.me}'s optimizer steps", steps, train.rounds * train.steps)
        books.compare(f"{agent.me}'s uploads sent", len(agent.uploads), train.rounds)
        mine = status.agents[agent.me]
        books.compare(f"{agent.me}'s rounds in /status", mine.rounds_contributed, train.rounds)
        books.compare(f"{agent.me}'s tokens in /status", mine.tokens, sent)
        books.compare(f"{agent.me}'s rounds on the ledger", on_ledger[agent.me].rounds, train.rounds)
        books.compare(f"{agent.me}'s tokens on the ledger", on_ledger[agent.me].tokens, sent)
        for r in range(1, train.rounds + 1):
            for s in range(train.steps):
                for kind in REPLIES:
                    got = agent.replies[(kind.name, r, s)]
                    if got == 0:
                        books.problems.append(f"{agent.me} never got {kind.name} of round {r} step {s}")
                    books.answered_again += max(0, got - 1)
    for record in status.history:
        if record.participants != names:
            books.problems.append(f"round {record.round} averaged {len(record.participants)} agents")
        sent = sum(a.uploads.get(record.round, 0) for a in run.agents)
        books.compare(f"round {record.round}'s tokens", record.tokens, sent)
    books.compare("rounds in /status", len(status.history), train.rounds)
    return books
