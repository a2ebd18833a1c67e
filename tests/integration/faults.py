"""The fault-injection suite's cases: each runs one federation through one fault to its end.

The tests (test_runtime.py, test_partition.py) assert on what a case returns; bench/reliability.py
runs every case and counts. `books` holds the rounds each agent says it trained and uploaded
against the rounds the ledger averaged it into and the totals the status shows, so "nothing
lost, nothing counted twice" is checked on the run's records. Free of pytest, like brokers.py,
so the benchmark can import it.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fsl_edge import protocol
from fsl_edge.audit import verify
from fsl_edge.broker import BrokerProcess
from fsl_edge.cli.federation import Federation
from fsl_edge.config import PrefixSettings, SelectionSettings
from fsl_edge.ledger import Contribution, effective_rounds
from fsl_edge.netshape import ShapedLink
from fsl_edge.status import Status

from .brokers import mqtt_client
from .runtime_harness import federation, finish, in_round, wait_for

SITES = ("circulatory", "injury", "neoplasms")
VICTIM = "injury"  # the site a fault hits: in the middle of the split server's order
SHORT_CUT_S = 2.0
"""A short partition. TCP notices a heal at its next retransmission, up to about as long again
(backoff), so the agent is silent for at most ~2x this: well under offline_after_s (8 s)."""
QUORUM_ROUNDS = "round 1 closes without the site the fault hit, after that site's first steps " \
    "had already trained the trunk (how many depends on when the fault fell), and a site that " \
    "is slow to come back misses later rounds too; the simulation has every site in every round"


@dataclass
class Outcome:
    fed: Federation
    not_deterministic: str = ""
    """Why the result cannot equal the fault-free run's ('' where it must)."""
    cut_s: float = 0.0
    """How long a partition lasted."""
    status: Status | None = None
    """The coordinator's last, once the run finished."""


def agent_killed(tmp: Path, broker: BrokerProcess) -> Outcome:
    """Three sites, 10 rounds: `injury` SIGKILLed at step 4 of round 1 and restarted at once.
    Round 1 closes on quorum without it; it resumes from its own saved state."""
    fed = federation(tmp, broker.url, sites=SITES, rounds=10, steps=20)

    def fault() -> None:
        wait_for(in_round(fed, 1, 4), 180, "round 1 under way", fed)
        killed = fed.processes.pop(f"agent-{VICTIM}")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        fed.start_agent(VICTIM)
        wait_for(lambda: (s := fed.status()) and len(s.history) >= 1, 120, "round 1 closed", fed)
    return _run(fed, fault, Outcome(fed, QUORUM_ROUNDS))


def coordinator_killed(tmp: Path, broker: BrokerProcess) -> Outcome:
    """Two sites, 3 rounds, with a server-side activation store and layer selection: the
    coordinator SIGKILLed at step 3 of round 2 and restarted on its checkpoint folder."""
    fed = federation(tmp, broker.url, rounds=3, steps=25,
                     prefix=PrefixSettings(frozen=2, send_keys=True, backend="torch"),
                     selection=SelectionSettings(policy="topk-gradnorm", fraction=0.5))

    def fault() -> None:
        wait_for(in_round(fed, 2, 3), 180, "round 2 under way", fed)
        killed = fed.processes.pop("coordinator")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        fed.start_coordinator()  # same checkpoint folder: it resumes after round 1
    return _run(fed, fault, Outcome(fed))


def broker_restarted(tmp: Path, broker: BrokerProcess) -> Outcome:
    """Two sites, 2 rounds: `broker` (which this stops and starts) restarted at step 5 of round 1,
    on the same port, without persistence: every session and queued message is gone."""
    fed = federation(tmp, broker.url, rounds=2, steps=25)

    def fault() -> None:
        wait_for(in_round(fed, 1, 5), 180, "round 1 under way", fed)
        broker.stop()
        wait_for(lambda: fed.status() is not None and fed.status().round >= 1, 5, "status")
        broker.start()
    return _run(fed, fault, Outcome(fed))


def partitioned(tmp: Path, broker: BrokerProcess, link: ShapedLink, length: str) -> Outcome:
    """Three sites; `injury` runs behind `link` and is cut off at its step 3 of round 1.

    `broker` must listen on link.bind_host. length "short": healed after SHORT_CUT_S, 2 rounds.
    "offline": healed once round 1 has closed without it (past offline_after_s), 3 rounds.
    "keepalive": healed only after the broker gave up on it too (its last will published), 3
    rounds. The longer two set quorum to every site, so round 2 waits for it to come back
    (whatever the number of rounds a machine could run during the cut).
    """
    short = length == "short"
    fed = federation(tmp, broker.url, sites=SITES, rounds=2 if short else 3, steps=20)
    if not short:
        fed.settings = fed.settings.model_copy(update={"quorum": len(SITES)})
    fed.agent_wrap, fed.agent_broker = link.wrap, link.broker_url(broker.port)
    fed.wrapped_sites = {VICTIM}
    outcome = Outcome(fed, "" if short else QUORUM_ROUNDS)
    wills: list[bytes] = []
    will_topic = protocol.topic_status(fed.settings.runtime.run_id, VICTIM)

    def fault() -> None:
        wait_for(site_at(fed, VICTIM, 1, 3), 180, f"{VICTIM} at step 3 of round 1", fed)
        link.partition()
        cut = time.monotonic()
        try:
            if short:
                time.sleep(SHORT_CUT_S)
                return
            wait_for(lambda: (s := fed.status()) and s.history, 120, "round 1 closed without it", fed)
            if length == "keepalive":  # 1.5 x the 15 s keepalive after the last packet it got
                wait_for(lambda: protocol.STATUS_OFFLINE in wills, 60, "the broker's last will", fed)
        finally:
            link.heal()
            outcome.cut_s = time.monotonic() - cut

    with mqtt_client(broker, "observer", subscribe=[will_topic],
                     on_message=lambda c, u, msg: wills.append(bytes(msg.payload))):
        return _run(fed, fault, outcome)


def site_at(fed: Federation, site: str, round_: int, step: int) -> Callable[[], bool]:
    """A predicate: the coordinator has seen `site` reach `step` of `round_`."""
    def check() -> bool:
        s = fed.status()
        a = s.agents.get(site) if s is not None else None
        return a is not None and s.round == round_ and a.round == round_ and a.step >= step
    return check


def _run(fed: Federation, fault: Callable[[], None], outcome: Outcome) -> Outcome:
    try:
        fed.start()
        fault()
        outcome.status = finish(fed)
    finally:
        fed.stop()
    return outcome


@dataclass
class Books:
    """Updates as the agents sent them and as the ledger counted them, as (site, round)."""

    sent: set[tuple[str, int]] = field(default_factory=set)
    """Rounds each agent trained to the end and uploaded (its log says so)."""
    counted: set[tuple[str, int]] = field(default_factory=set)
    """Averaged into a round the run went on from (the ledger)."""
    left_out: set[tuple[str, int]] = field(default_factory=set)
    """Rounds the coordinator went on without a site: an upload after that is not expected."""
    twice: list[str] = field(default_factory=list)
    """Where the status's totals disagree with the ledger's (a contribution counted twice)."""

    @property
    def lost(self) -> set[tuple[str, int]]:
        return self.sent - self.counted - self.left_out

    @property
    def unexplained(self) -> set[tuple[str, int]]:
        """Counted without an agent having sent it: must be empty."""
        return self.counted - self.sent


def books(fed: Federation, status: Status) -> Books:
    """Compare what the agents sent, the ledger counted and the status shows."""
    logs = fed.workdir / "logs"
    b = Books()
    for log in logs.glob("agent-*.log"):
        b.sent |= {(a, int(r)) for a, r in re.findall(r"(\S+): round (\d+) done", log.read_text())}
    b.left_out = {(a, int(r)) for r, a in re.findall(r"round (\d+) goes on without (\S+)",
                                                      (logs / "coordinator.log").read_text())}
    report = verify(fed.checkpoint_dir / "ledger.jsonl")
    for r, entry in effective_rounds(report.entries).items():
        b.counted |= {(a, r) for a in entry.participants}
    ledger = report.contributions()
    for agent, st in status.agents.items():
        c = ledger.get(agent, Contribution())
        if (c.rounds, c.tokens) != (st.rounds_contributed, st.tokens):
            b.twice.append(f"{agent}: status {st.rounds_contributed} rounds, {st.tokens} tokens; "
                           f"ledger {c}")
    if sum(r.tokens for r in status.history) != sum(c.tokens for c in ledger.values()):
        b.twice.append("the rounds' token totals differ from the ledger's")
    return b
