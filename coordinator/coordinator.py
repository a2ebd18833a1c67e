"""The coordinator's round state machine, agent registry and message handling.

announce round -> send the global site adapter -> agents run their steps against the split
server -> agents upload adapters -> FedAvg -> checkpoint -> next round. One thread runs it all:
messages arrive through the link's queue and `tick` enforces liveness and deadlines between
them, so no state is shared with paho's thread. The status API reads a published copy.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
import time
import uuid
from dataclasses import dataclass

import torch

from fsl_edge import protocol
from fsl_edge.compression import Downlink, StepCodec, apply
from fsl_edge.config import ServerCopies
from fsl_edge.ledger import LEDGER, Ledger
from fsl_edge.robust import Quarantine, Verdict, aggregate_round
from fsl_edge.errors import CodecError, ProtocolError
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.split import check_parity, discover
from fsl_edge.status import AgentStatus, RoundRecord, Status, Traffic
from fsl_edge.step import ServerPart, SitePart, party_options
from fsl_edge.transport import MqttLink, Received
from fsl_edge.trunk_copies import check_per_site
from fsl_edge.wire import (Address, adapter_envelope, adapter_state, meta_number, raw_bytes,
                           step_message)

from . import checkpoint
from .settings import CoordinatorSettings
from .fleet import Fleet
from .planning import record, record_link
from .split_server import SplitServer
from .workers import TrunkWorkers

log = logging.getLogger("fsl_edge.coordinator")
ME = "coordinator"


@dataclass
class Upload:
    state: dict[str, torch.Tensor]
    tokens: int
    loss: float


class Coordinator:
    def __init__(self, settings: CoordinatorSettings, model: torch.nn.Module, link: MqttLink):
        self.settings, self.link = settings, link
        self.run_id = settings.runtime.run_id
        train = settings.training.train
        # The same RNG order as simulation.simulate: trunk LoRA first, then the site LoRA that
        # every agent starts from, so a distributed run can reproduce a simulated one exactly.
        torch.manual_seed(train.seed)
        self.cut = settings.training.split.cut(discover(model).n_blocks)
        settings.training.check_prefix(self.cut)
        check_parity(discover(model), (self.cut.a, self.cut.b) if self.cut.b < self.cut.n
                     else (self.cut.a,))
        lora = settings.training.lora
        options = party_options(settings.training)
        self.trunk = ServerPart(copy.deepcopy(model), self.cut, lora, train.lr, **options)
        self.site_adapter = SitePart(copy.deepcopy(model), self.cut, lora, train.lr, **options).adapter()
        self.fleet = Fleet(settings.training, model)
        self.pipes = settings.training.compression.pipelines()
        self.split = SplitServer(self.trunk, self.run_id, StepCodec(self.pipes))
        # per-site trunk copies: split-server workers serve the steps, this process averages
        check_per_site(settings.training)
        self.workers = TrunkWorkers(self.run_id) \
            if settings.training.split.server is ServerCopies.PER_SITE else None
        # the site adapter as the agents hold it; it moves by (compressed) deltas
        self.downlink = Downlink(self.pipes.download)
        self.incarnation = uuid.uuid4().hex[:8]
        self.status = Status(run=self.run_id, rounds=train.rounds, steps=train.steps,
                             model=settings.model, mode=self.cut.mode.value, started_at=time.time())
        self.welcomed: set[str] = set()
        # agents that have loaded their model and data: only they are given a place in a round
        # (an agent still loading would hold up the split server's order)
        self.ready: set[str] = set()
        self.introduced: dict[str, float] = {}  # agent -> when it was last asked to say hello
        self.rejected: Counter[str] = Counter()  # by reason; the link counts what it drops
        self.heard: dict[str, float] = {}  # agent -> monotonic time its last message arrived
        self.round, self.active, self.attempts, self.attempt = 0, False, 0, ""
        self.members: set[str] = set()  # agents still in the active round
        self.uploads: dict[str, Upload] = {}
        self.round_traffic: dict[str, Traffic] = {}
        self.round_started = 0.0
        self.start_msg: Envelope | None = None
        self.start_full: Envelope | None = None  # the same start with the adapter in full
        self.starts: dict[str, tuple[Envelope, dict]] = {}  # hetero: each agent's start, its base
        self.published = self.status.model_copy(deep=True)
        ckpt = checkpoint.load(settings.checkpoint_dir, self.trunk, settings.fingerprint())
        if ckpt is not None:
            self.round, self.site_adapter = ckpt.round, ckpt.site_adapter
            if "selection" in ckpt.state:
                self.trunk.selector.load_state_dict(ckpt.state["selection"], self.trunk.optimizer)
            self.status.history = [RoundRecord(**h) for h in ckpt.state["history"]]
            # the registry: who contributed what so far; every agent is offline until it says hello
            self.status.agents = {a: AgentStatus(**r) for a, r in ckpt.state["registry"].items()}
            self.status.checkpoint = str(settings.checkpoint_dir)
            log.info("resumed from %s after round %d", settings.checkpoint_dir, ckpt.round)
        self.quarantine = Quarantine.from_settings(settings.training.robust)
        if ckpt is not None and "quarantine" in ckpt.state:
            self.quarantine.load_state_dict(ckpt.state["quarantine"])
        # every round on a signed, hash-chained record, written before its checkpoint
        self.ledger = Ledger.open(settings.checkpoint_dir / LEDGER, None, self.run_id,
                                  settings.fingerprint(), resumed=self.round)
        self.status.round = self.round
        if self.round >= train.rounds:
            self.status.state = "finished"

    # --- the loop ---
    @property
    def finished(self) -> bool:
        return self.status.state == "finished"

    def run(self, stop=lambda: False) -> Status:
        """Serve until the last round is aggregated (or `stop()` says so)."""
        self.link.publish(protocol.topic_broadcast(self.run_id),
                          Envelope(MessageKind.HELLO, self.run_id, ME,
                                   meta={"incarnation": self.incarnation}))
        if not self.finished:
            self.status.state = "waiting"
        while not self.finished and not stop():
            received = self.link.get(timeout=0.1)
            if received is not None:
                try:
                    self.handle(received)
                except Exception:  # noqa: BLE001 - one bad message must not end the run
                    log.exception("internal error on a message from %s", received.topic.agent)
                    self.rejected["internal"] += 1
            self.tick()
        self.link.publish(protocol.topic_broadcast(self.run_id),
                          Envelope(MessageKind.ROUND_END, self.run_id, ME, self.round,
                                   meta={"finished": self.finished}))
        self.publish_status()
        return self.status

    def tick(self) -> None:
        now, rt = time.monotonic(), self.settings.runtime
        for agent in list(self.status.agents):
            if now - self.heard.get(agent, -1e9) > rt.offline_after_s:
                self.gone(agent, "not heard from")
        if self.active:
            waiting_on = self.split.waiting_on()
            if waiting_on and now - self.split.turn_since > rt.offline_after_s:
                self.gone(waiting_on, "its turn at the split server stalled")
            if now - self.round_started > rt.round_timeout_s:
                for agent in sorted(self.members - set(self.uploads)):
                    self.gone(agent, "round deadline")
                if self.workers is not None:  # uploaded, but its worker's copy never came
                    for agent in sorted(self.workers.missing(set(self.uploads))):
                        log.warning("round %d goes on without %s: no trunk copy", self.round, agent)
                        self.members.discard(agent)
                        del self.uploads[agent]
        if self.active:
            self.maybe_close()
        elif not self.finished:
            self.maybe_start()
        if time.time() - self.status.updated_at > 0.2:
            self.publish_status()

    def publish_status(self) -> None:
        self.status.updated_at = time.time()
        self.status.layers = self.trunk.selector.history[-8:]
        self.status.prefix_store = self.trunk.store.as_dict()
        self.status.rejected = dict(sorted((self.link.rejected_counts() + self.rejected).items()))
        self.published = self.status.model_copy(deep=True)  # read by the HTTP thread

    # --- messages ---
    def handle(self, received: Received) -> None:
        env, agent = received.envelope, received.topic.agent
        if received.topic.channel == "worker" and self.workers is not None:
            return self.on_worker(agent, env)
        if agent == ME or received.topic.channel not in ("up", "status"):
            return
        if env.run_id != self.run_id:
            return self.reject("wrong_run", agent, f"run {env.run_id!r}")
        if received.topic.channel == "status":
            st = self.status.agents.get(agent)
            if st is not None and env.meta.get("state") == protocol.STATUS_OFFLINE.decode():
                # The broker lost the agent. Shown at once, but it keeps its place in the round
                # for offline_after_s: a network blip or a broker restart must not cost a round.
                st.state = "offline"
            elif st is not None and st.state == "offline":
                st.state, st.last_seen = "online", time.time()  # back within its grace
                self.heard[agent] = received.received_at  # or the next tick drops it again
            return
        if env.kind is not MessageKind.HELLO and agent not in self.welcomed:
            self.ask_to_introduce(agent)
            return self.reject("unknown_agent", agent, env.kind.name)
        if env.kind is MessageKind.HELLO and agent not in self.welcomed and \
                len(self.welcomed) >= self.settings.max_agents:
            return self.reject("too_many_agents", agent, "HELLO")
        st = self.status.agents.setdefault(agent, AgentStatus())
        st.last_seen, self.heard[agent] = time.time(), received.received_at
        if st.state == "offline" and env.kind is not MessageKind.HELLO:
            st.state = "online"
        self.count(agent, env, received.size)
        try:
            if env.kind is MessageKind.HELLO:
                self.on_hello(agent, env)
            elif env.kind in (MessageKind.ACTIVATION_UP, MessageKind.GRADIENT_UP):
                self.on_step(agent, env)
            elif env.kind is MessageKind.ADAPTER_UP:
                self.on_upload(agent, env)
        except (ProtocolError, CodecError) as e:
            reason = "non_finite" if "non-finite" in str(e) else \
                "bad_shape" if ("shape" in str(e) or "dtype" in str(e)) else "malformed"
            self.reject(reason, agent, str(e))

    def ask_to_introduce(self, agent: str) -> None:
        """An agent this coordinator has not welcomed (it restarted, and its broadcast HELLO was
        lost) would re-send its last upload for ever: ask it, at most every few seconds."""
        now = time.monotonic()
        if now - self.introduced.get(agent, -1e9) < 5.0:
            return
        if len(self.introduced) >= 1024:  # the names are the sender's to invent: stay bounded
            self.introduced = {a: t for a, t in self.introduced.items() if now - t < 5.0}
            if len(self.introduced) >= 1024:
                return
        self.introduced[agent] = now
        self.link.publish(protocol.topic_down(self.run_id, agent),
                          Envelope(MessageKind.HELLO, self.run_id, ME, self.round,
                                   meta={"incarnation": self.incarnation, "introduce": True}))

    def reject(self, reason: str, agent: str | None, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("dropped a message from %s (%s): %s", agent, reason, detail)

    def send(self, agent: str, env: Envelope) -> None:
        self.count(agent, env, self.link.publish(protocol.topic_down(self.run_id, agent), env))

    def count(self, agent: str, env: Envelope, size: int) -> None:
        """Bytes on the wire and their uncompressed equivalent: run, agent and round totals."""
        kind, raw = env.kind.name.lower(), raw_bytes(env)
        books = [self.status.traffic, self.round_traffic]
        if agent in self.status.agents:
            books.append(self.status.agents[agent].traffic)
        for book in books:
            book.setdefault(kind, Traffic()).add(size, raw)

    def on_hello(self, agent: str, env: Envelope) -> None:
        if self.active and agent in self.members and agent not in self.uploads \
                and self.split.steps_done.get(agent, 0) > 0:
            # it restarted mid-round and cannot continue where it was: the round goes on
            # without it, and it joins the next one
            self.gone(agent, "restarted mid-round")
        self.welcomed.add(agent)
        try:
            self.fleet.planning.take(agent, env.meta)
        except ProtocolError as e:  # it still trains: at its pin, or the run's split and rank
            self.reject("bad_profile", agent, str(e))
        if env.meta.get("ready", True) is False:  # agents that do not say are ready
            self.ready.discard(agent)
        else:
            self.ready.add(agent)
        st = self.status.agents[agent]
        if st.state in ("offline", "dropped"):
            st.state = "online"
        self.send(agent, Envelope(MessageKind.HELLO, self.run_id, agent, self.round, meta={
            "model": self.settings.model, "incarnation": self.incarnation,
            "timing": self.settings.runtime.timing(),
            "training": self.settings.training.model_dump(mode="json")}))
        self.instruct(agent, full=True)  # (re)introduced or asking to resync: no copy to build on

    def instruct(self, agent: str, full: bool = False) -> None:
        """Send an agent what it should be doing now (again: it asked, so it lost it). `full`:
        the round's adapter in full, for an agent that does not hold the copy the delta needs."""
        if self.finished:
            self.send(agent, Envelope(MessageKind.ROUND_END, self.run_id, agent, self.round,
                                      meta={"finished": True}))
        elif self.active and agent in self.members and agent not in self.uploads:
            self.send(agent, self.starts[agent][0] if self.fleet.hetero
                      else self.start_full if full else self.start_msg)

    def on_worker(self, worker: str, env: Envelope) -> None:
        if env.run_id != self.run_id:
            return self.reject("wrong_run", worker, f"run {env.run_id!r}")
        try:
            for topic, reply in self.workers.on_message(worker, env, self.members if self.active else set()):
                self.link.publish(topic, reply)
        except (ProtocolError, CodecError) as e:
            if "non-finite" not in str(e):
                return self.reject("malformed", worker, str(e))
            # a site's trunk copy diverged: the round goes on without the site (its update
            # with it), as for a non-finite upload
            site = env.agent_id
            self.reject("non_finite", worker, f"{site}'s trunk copy: {e}")
            if site in self.members:
                self.members.discard(site)
                self.uploads.pop(site, None)
                self.ledger.append_rejected(self.round, site, "non-finite trunk copy")
        self.status.workers = self.workers.workers

    def on_step(self, agent: str, env: Envelope) -> None:
        if self.workers is not None:
            return self.reject("malformed", agent, f"{env.kind.name}: this run's steps are "
                               "served by split-server workers (split.server 'per-site')")
        # the content is checked first, whatever the round: a bad tensor is refused as such
        message = step_message(env, protocol.Limits().max_tensor_bytes)
        if env.kind is MessageKind.ACTIVATION_UP:
            message.validate(self.trunk.parts.hidden_size)
        if not self.active or env.round != self.round or agent not in self.members \
                or env.meta.get("attempt") != self.attempt:
            self.reject("late", agent, f"{env.kind.name} for round {env.round} step {env.step}")
            return self.instruct(agent)
        st = self.status.agents[agent]
        st.state, st.round, st.step = "training", env.round, env.step
        self.status.step = max(self.status.step, env.step)
        for to, reply in self.split.on_request(agent, env, message):
            self.send(to, reply)

    def on_upload(self, agent: str, env: Envelope) -> None:
        if not self.active or env.round != self.round or agent not in self.members \
                or agent in self.uploads or env.meta.get("attempt") != self.attempt:
            return self.instruct(agent)  # a resend, or from an agent the round left behind
        if env.meta.get("version") != self.version:
            self.reject("malformed", agent, f"adapter delta against copy "
                        f"{env.meta.get('version')!r}, this round's is {self.version!r}")
            return self.instruct(agent, full=True)  # it trained from another copy: redo it
        try:
            base = self.starts[agent][1] if self.fleet.hetero else self.site_adapter
            state = adapter_state(env, base, protocol.Limits().max_tensor_bytes)
        except ProtocolError as e:
            if "non-finite" not in str(e):
                raise
            # a diverged site: the round goes on without it, the strike counts towards a
            # quarantine, and the ledger says why (it would re-send the same update for ever)
            self.reject("non_finite", agent, str(e))
            self.ledger.append_rejected(self.round, agent, "non-finite update")
            self.status.agents[agent].updates_flagged += 1
            for newly in self.quarantine.record(self.round, {agent: True}):
                log.warning("%s is quarantined: its updates failed the checks", newly)
            self.members.discard(agent)
            return
        tokens = meta_number(env.meta, "tokens", int, minimum=1)
        loss = meta_number(env.meta, "loss", float)
        layers, cache = reported_layers(env.meta), reported_cache(env.meta)
        self.uploads[agent] = Upload(state, tokens, loss)
        st = self.status.agents[agent]
        st.state, st.loss, st.tokens = "online", loss, st.tokens + tokens
        st.layers, st.cache = layers, cache
        backend = env.meta.get("prefix_backend")
        st.prefix_backend = backend[:64] if isinstance(backend, str) else None
        st.tokens_per_s = tokens / max(time.monotonic() - self.round_started, 1e-6)
        record(self.status.planner, agent, time.monotonic() - self.round_started,
               self.settings.training.train.steps)
        record_link(self.status.planner, agent, env.meta.get("link"))

    def close_copies(self, names: list[str], accepted: list[str]) -> None:
        """SplitFed-V1: the round's trunk is the average of the copies of the sites whose
        update was accepted; every site's steps are counted as its worker saw them."""
        for agent in names:
            for kind, (n, size, raw) in self.workers.traffic.get(agent, {}).items():
                for book in (self.status.traffic, self.round_traffic, self.status.agents[agent].traffic):
                    book.setdefault(kind, Traffic()).add(size, raw, n)
        self.trunk.load_adapter(self.workers.close({a: self.uploads[a].tokens for a in accepted}))
        self.status.workers = self.workers.workers

    def gone(self, agent: str, why: str) -> None:
        """Take an agent that has been silent too long out of the running round."""
        st = self.status.agents[agent]
        if st.state != "offline":
            log.warning("agent %s is offline (%s)", agent, why)
        st.state = "offline"
        if self.active and agent in self.members and agent not in self.uploads:
            log.warning("round %d goes on without %s", self.round, agent)
            self.members.discard(agent)
            for to, reply in self.split.drop(agent):
                self.send(to, reply)

    # --- rounds ---
    @property
    def version(self) -> str:
        """Names the copy of the site adapter the agents hold (unique across restarts)."""
        return f"{self.incarnation}-{self.downlink.version}"

    def online(self) -> list[str]:
        return sorted(a for a in self.ready if self.status.agents[a].state != "offline")

    def maybe_start(self) -> None:
        # the first round of this process (a fresh run, or one resumed after a crash) waits for
        # min_agents, so a restart does not leave behind the agents still reconnecting
        need = self.settings.min_agents if self.attempts == 0 else self.settings.quorum
        for agent in self.quarantine.release(self.round + 1):
            log.info("%s is released from quarantine", agent)
        excluded = self.quarantine.excluded(self.round + 1)
        for agent in excluded & set(self.status.agents):
            if self.status.agents[agent].state == "online":
                self.status.agents[agent].state = "quarantined"
        # a quarantined site cannot count towards the agents a round waits for: its term runs
        # in rounds, so waiting for it would wait for ever
        need = max(1, min(need, len(set(self.status.agents) - excluded)))
        agents = [a for a in self.online() if a not in excluded]
        if len(agents) < need:
            return
        if self.round == 0 and self.attempts == 0:  # planner on: plan these agents, once
            self.status.planner = self.fleet.planning.make(agents) or self.status.planner
        if self.round == 0 and self.attempts == 0 and self.fleet.needs_rebuild(agents, self.trunk):
            # the first round's agents name their cuts and ranks: the trunk serves those
            self.trunk, self.site_adapter = self.fleet.build(agents)
            self.split.part = self.trunk
        unserved = [a for a in agents if self.fleet.setup(a).ab not in self.trunk.cuts]
        for agent in unserved:
            log.warning("%s is pinned to cut %s, which the trunk does not serve; it waits",
                        agent, self.fleet.setup(agent).ab)
        agents = [a for a in agents if a not in unserved]
        if len(agents) < need:
            return
        self.round += 1
        self.attempts += 1
        self.attempt = f"{self.incarnation}-{self.attempts}"
        self.active, self.members, self.uploads, self.round_traffic = True, set(agents), {}, {}
        self.round_started = time.monotonic()
        # to undo the trunk's steps if the round is abandoned: agents replay it from its start
        self.trunk_snapshot = (self.trunk.adapter(), copy.deepcopy(self.trunk.optimizer.state_dict()),
                               self.downlink.shared, self.downlink.version,
                               copy.deepcopy(self.trunk.selector.state_dict()))
        train = self.settings.training.train
        if self.workers is None:
            self.split.begin_round(self.round, agents, train.steps)
        else:  # before the agents hear of the round, so the trunk is there for their first steps
            self.link.publish(*self.workers.begin(self.round, self.attempt, train.steps,
                                                  self.trunk.adapter()))
        base_version = self.version
        if self.fleet.hetero:  # each agent its own blocks at its own rank, in full
            self.downlink.version += 1
            at = Address(self.run_id, "", self.round)
            meta = {"steps": train.steps, "attempt": self.attempt, "participants": agents,
                    "version": self.version, "full": True}
            self.starts = {}
            for agent in agents:
                view = self.fleet.view(self.site_adapter, agent)
                self.starts[agent] = (adapter_envelope(
                    MessageKind.ROUND_START, view, at, {**meta, **self.fleet.planning.start_meta(agent)},
                    self.pipes.full_download), view)
            self.status.state, self.status.round, self.status.step = "training", self.round, 0
            log.info("round %d starts with %s", self.round, ", ".join(agents))
            for agent in agents:
                self.send(agent, self.starts[agent][0])
            return
        delta = self.downlink.advance(self.site_adapter)
        meta = {"steps": train.steps, "attempt": self.attempt, "participants": agents,
                "version": self.version, **self.fleet.planning.start_meta(agents[0])}
        at = Address(self.run_id, "", self.round)
        self.start_full = adapter_envelope(MessageKind.ROUND_START, self.downlink.shared, at,
                                           {**meta, "full": True}, self.pipes.full_download)
        self.start_msg = self.start_full if delta is None else adapter_envelope(
            MessageKind.ROUND_START, delta, at, {**meta, "base": base_version}, self.pipes.download)
        self.status.state, self.status.round, self.status.step = "training", self.round, 0
        log.info("round %d starts with %s", self.round, ", ".join(agents))
        for agent in agents:
            self.send(agent, self.start_msg)

    def maybe_close(self) -> None:
        if not self.members:
            log.warning("round %d lost every agent; it starts again", self.round)
            adapter, optimizer, self.downlink.shared, self.downlink.version, selection = \
                self.trunk_snapshot
            self.trunk.load_adapter(adapter)
            self.trunk.selector.load_state_dict(selection, self.trunk.optimizer)
            self.trunk.optimizer.load_state_dict(optimizer)
            self.active, self.round = False, self.round - 1
            self.status.round = self.round
            if self.workers is not None:
                self.workers.end()
            return
        if not self.split.finished or not self.members <= set(self.uploads):
            return
        if self.workers is not None and self.workers.missing(set(self.uploads)):
            return
        names = sorted(self.uploads)
        robust = self.settings.training.robust
        if self.fleet.hetero:  # per-layer FedAvg across cuts and ranks (check_hetero: no screens)
            self.site_adapter = self.fleet.close(
                {a: (apply(self.starts[a][1], self.uploads[a].state), self.uploads[a].tokens)
                 for a in names}, self.trunk)
            verdicts = {a: Verdict("accepted", 0.0) for a in names}
        else:
            self.site_adapter, outcome = aggregate_round(
                self.site_adapter, [self.uploads[a].state for a in names],
                [self.uploads[a].tokens for a in names], robust,
                self.settings.training.train.server_lr)
            verdicts = dict(zip(names, outcome.verdicts))
        rejected = [(a, v.status + ": " + v.reason, self.uploads[a].state)
                    for a, v in verdicts.items() if v.flagged]
        for agent, reason, _ in rejected:
            self.reject(verdicts[agent].status, agent, reason)
            self.status.agents[agent].updates_flagged += 1
        for agent in self.quarantine.record(self.round, {a: v.flagged for a, v in verdicts.items()}):
            log.warning("%s is quarantined: its updates failed the checks %d rounds in a row",
                        agent, robust.quarantine_after)
        accepted = [a for a in names if verdicts[a].status != "rejected"]
        if self.workers is not None:
            self.close_copies(names, accepted)
        self.ledger.append_round(self.round, {a: (self.uploads[a].tokens, self.uploads[a].state)
                                              for a in accepted},
                                 self.site_adapter, self.trunk.adapter(), rejected=rejected)
        tokens = sum(u.tokens for u in self.uploads.values())
        self.status.history.append(RoundRecord(
            round=self.round, participants=names, tokens=tokens,
            train_loss=sum(self.uploads[a].loss * self.uploads[a].tokens for a in names) / tokens,
            site_loss={a: self.uploads[a].loss for a in names},
            seconds=time.monotonic() - self.round_started, traffic=self.round_traffic))
        for a in accepted:
            self.status.agents[a].rounds_contributed += 1
        checkpoint.save(self.settings.checkpoint_dir, self.round, self.site_adapter, self.trunk,
                        {"fingerprint": self.settings.fingerprint(),
                         "selection": self.trunk.selector.state_dict(),
                         "quarantine": self.quarantine.state_dict(),
                         "history": [h.model_dump() for h in self.status.history],
                         "registry": {a: {"tokens": st.tokens, "rounds_contributed": st.rounds_contributed,
                                          "loss": st.loss} for a, st in self.status.agents.items()}})
        self.status.checkpoint = str(self.settings.checkpoint_dir)
        self.active = False
        log.info("round %d closed: %s, %d tokens", self.round, ", ".join(names), tokens)
        if self.round >= self.settings.training.train.rounds:
            self.status.state = "finished"


def reported_layers(meta: dict) -> list[tuple[int, list[int]]]:
    """An agent's layer selection from its upload, kept only if well-formed (it is shown, not used)."""
    layers = meta.get("layers")
    ok = isinstance(layers, list) and len(layers) <= 64 and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and isinstance(e[1], list)
        and all(isinstance(b, int) for b in e[1]) for e in layers)
    return [(e[0], e[1]) for e in layers] if ok else []


def reported_cache(meta: dict) -> dict[str, float]:
    """An agent's cache figures from its upload: finite, non-negative and bounded, else none."""
    cache = meta.get("cache")
    if not isinstance(cache, dict) or len(cache) > 16:
        return {}
    ok = {k: v for k, v in cache.items() if isinstance(k, str) and len(k) <= 32 and
          isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e18}
    return {k: float(v) for k, v in ok.items()}
