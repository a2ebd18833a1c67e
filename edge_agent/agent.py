"""The edge agent: announce itself, then train each round it is told to, against the split server.

Every request (HELLO, a step's activation or gradient, the adapter upload) is sent again if its
answer does not come within `resend_s`: the coordinator answers a repeated request with the
answer it already gave, so a lost message, a broker restart or a reconnect costs time, never a
double update. A ROUND_START of a new attempt (the coordinator restarted) interrupts whatever
the agent waits for; if it repeats a round, the agent first rewinds to that round's start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fsl_edge import protocol
from fsl_edge.compression import StepCodec, Uplink, apply
from fsl_edge.config import LearningSettings, ServerCopies, SplitMode
from fsl_edge.data import BatchStream
from fsl_edge.errors import ProtocolError, TransportError
from fsl_edge.planner import NodePlan
from fsl_edge.profile import NodeProfile
from fsl_edge.protocol import Envelope, Flag, MessageKind
from fsl_edge.step import SitePart
from fsl_edge.transport import MqttLink
from fsl_edge.wire import (Address, adapter_envelope, adapter_state, meta_number, step_envelope,
                           step_message)

from . import state
from .settings import AgentSettings

log = logging.getLogger("fsl_edge.edge_agent")


@dataclass(frozen=True)
class Deferred:
    """A site whose cut and rank the coordinator plans (`planner.enabled`): its model and data
    are loaded and measured; its part is made from the first ROUND_START, which names its plan."""

    profile: NodeProfile
    make: Callable[[NodePlan | None], SitePart]
    """This node's NodePlan (None: it was not planned: its pin, else the run's) -> its part."""
    relink: Callable[[], dict] | None = None
    """Measures the link to the broker again: {up_bytes_per_s, down_bytes_per_s, rtt_s,
    measured_at}; None: never (planner.relink_every 0)."""
    relink_every: int = 0


class Interrupted(Exception):
    """The coordinator sent a new instruction while the agent waited for something else."""

    def __init__(self, envelope: Envelope):
        super().__init__(envelope.kind.name)
        self.envelope = envelope


class WorkerLost(Exception):
    """The split-server worker serving this round's steps stopped answering."""


class Agent:
    def __init__(self, settings: AgentSettings, link: MqttLink, build):
        """`build(welcome_meta) -> (SitePart | Deferred, BatchStream)` loads the model and data
        once welcomed (Deferred: the part waits for the plan)."""
        self.settings, self.link, self.build = settings, link, build
        self.me, self.run_id = settings.agent_id, settings.runtime.run_id
        self.part: SitePart | None = None
        self.deferred: Deferred | None = None  # with the planner: the part waits for the plan
        self.stream: BatchStream | None = None
        self.attempt: str | None = None  # the ROUND_START attempt being worked on
        self.snapshot: state.RoundSnapshot | None = None
        self.codec: StepCodec | None = None  # how the run compresses; set by the welcome
        self.uplink: Uplink | None = None
        # the coordinator's copy of the site adapter this agent holds, and its name: the
        # coordinator sends deltas against it
        self.shared: dict | None = None
        self.version: str | None = None
        self.rounds_done = 0
        self.limits = protocol.Limits()
        # split.server per-site: split-server workers serve the steps; a round's first step goes
        # to whichever the broker picks, the rest to the worker that answered it
        self.workers = False
        self.link_now: dict | None = None  # the link as last re-measured (planner.relink_every)
        self.step_topic: str | None = None
        # the coordinator's grace decides when this agent counts as gone: its welcome says how
        # often to beat and to resend, and those replace the agent's own until then
        self.timing = settings.runtime.timing()
        self._stop = threading.Event()

    # --- messaging ---
    def send(self, env: Envelope) -> None:
        step = env.kind in (MessageKind.ACTIVATION_UP, MessageKind.GRADIENT_UP)
        self.link.publish(self.step_topic if step and self.step_topic
                          else protocol.topic_up(self.run_id, self.me), env)

    def request(self, env: Envelope, answers: set[MessageKind], round_: int | None = None,
                step: int | None = None, send: bool = True, interruptible: bool = True,
                lost_after: float | None = None) -> Envelope:
        """Send `env` (unless already sent) and wait for an answer of one of `answers` kinds
        (for this round and step), sending it again every `resend_s`; WorkerLost after
        `lost_after` seconds without one."""
        if send:
            self.send(env)
        deadline = time.monotonic() + self.timing["resend_s"]
        given_up = None if lost_after is None else time.monotonic() + lost_after
        while not self._stop.is_set():
            if given_up is not None and time.monotonic() > given_up:
                raise WorkerLost()
            received = self.link.get(timeout=0.2)
            # paho itself retransmits what it could not deliver: resend only over a live link
            if time.monotonic() > deadline and self.link.connected.is_set():
                log.info("%s: %s unanswered; sending it again", self.me, env.kind.name)
                env.flags |= Flag.RESEND
                self.send(env)
                deadline = time.monotonic() + self.timing["resend_s"]
            if received is None:
                continue
            got = received.envelope
            if got.run_id != self.run_id:
                continue
            if got.kind is MessageKind.ROUND_START and got.meta.get("attempt") == self.attempt:
                continue  # a repeat of the round being (or just) trained
            if got.kind is MessageKind.HELLO and (received.topic.channel == "broadcast"
                                                  or got.meta.get("introduce") is True):
                self.send(self.hello())  # a (re)started coordinator: introduce ourselves again
            elif got.kind in answers and (round_ is None or got.round == round_) \
                    and (step is None or got.step == step):
                return got
            elif interruptible and (got.kind is MessageKind.ROUND_END or (
                    got.kind is MessageKind.ROUND_START and got.meta.get("attempt") != self.attempt)):
                raise Interrupted(got)
        raise KeyboardInterrupt

    def base_of(self, start: Envelope) -> Envelope:
        """Take the round's copy of the site adapter from its ROUND_START: in full, or as a delta
        against the copy this agent holds. Without that copy (it restarted, or missed a round) it
        asks for the full one; returns the start it used."""
        while True:
            if start.meta.get("full"):
                self.shared = adapter_state(start, self.part.adapter(), self.limits.max_tensor_bytes)
                break
            if self.version is not None and start.meta.get("base") == self.version:
                delta = adapter_state(start, self.part.adapter(), self.limits.max_tensor_bytes)
                self.shared = apply(self.shared, delta)
                break
            log.info("%s: round %d sent a delta against a copy it does not hold; asking for it "
                     "in full", self.me, start.round)
            got = self.request(self.hello(resync=True), {MessageKind.ROUND_START})
            if got.round != start.round or got.meta.get("attempt") != start.meta.get("attempt"):
                raise Interrupted(got)  # the round moved on meanwhile: start over from that
            start = got
        self.version = start.meta.get("version")
        return start

    def ask(self, env: Envelope, answer: MessageKind, round_: int, step: int):
        """One hop of a step: send it (tagged with the round's attempt), return the reply.
        If the server lost the activations the keys stood for, send them and ask again."""
        env.meta["attempt"] = self.attempt  # a reply to an older attempt is never taken for this
        send, sent_hidden = True, any(t.name == "hidden" for t in env.tensors)
        while True:
            # a worker of its own (split.server per-site): if it goes away, so does the round
            pinned = self.workers and self.step_topic != protocol.topic_step(self.run_id, self.me)
            reply = self.request(env, {answer}, round_, step, send=send,
                                 lost_after=self.timing["worker_lost_s"] if pinned else None)
            worker = reply.meta.get("worker")
            if self.workers and isinstance(worker, str) and protocol.valid_id(worker):
                self.step_topic = protocol.topic_step_to(self.run_id, self.me, worker)
            if reply.meta.get("need_hidden") is not True:
                return step_message(reply, self.limits.max_tensor_bytes)
            if sent_hidden:  # a late answer to a resend of the keys: the activations are on their way
                send = False
                continue
            log.info("%s: the server holds no copy of step %d's activations; sending them",
                     self.me, step)
            env = step_envelope(self.part.resend_activations(),
                                Address(self.run_id, self.me, round_, step), self.codec)
            env.meta["attempt"] = self.attempt
            send, sent_hidden = True, True

    def welcome_timing(self, meta: dict) -> dict[str, float]:
        timing = meta.get("timing")
        if not isinstance(timing, dict):
            return self.timing  # an older coordinator: keep our own
        # a key it does not send (an older coordinator): keep our own
        return {k: meta_number(timing, k, float, minimum=0.05) if k in timing else v
                for k, v in self.timing.items()}

    def hello(self, resync: bool = False) -> Envelope:
        # ready: it has built its part (or, planned, measured itself); until then it is welcomed
        # but given no place in a round
        meta = {"rounds_done": self.rounds_done, "resync": resync,
                "ready": self.part is not None or self.deferred is not None}
        if self.deferred is not None:
            meta["profile"] = self.deferred.profile.model_dump(mode="json")
        return Envelope(MessageKind.HELLO, self.run_id, self.me, meta=meta)

    def heartbeats(self) -> None:
        while not self._stop.wait(self.timing["heartbeat_s"]):
            self.send(Envelope(MessageKind.HEARTBEAT, self.run_id, self.me))

    # --- lifecycle ---
    def run(self) -> int:
        """Work until the coordinator says the run is finished; returns the rounds trained."""
        beat = threading.Thread(target=self.heartbeats, daemon=True, name="heartbeat")
        try:
            welcome = self.request(self.hello(), {MessageKind.HELLO}, interruptible=False)
            self.timing = self.welcome_timing(welcome.meta)
            # after the welcome: a heartbeat before it would only count as an unknown agent; from
            # here it keeps the agent alive through the model load
            beat.start()
            training = LearningSettings.model_validate(welcome.meta["training"])
            pipes = training.compression.pipelines()
            self.workers = training.split.server is ServerCopies.PER_SITE
            self.codec, self.uplink = StepCodec(pipes), Uplink(pipes.upload)
            part, self.stream = self.build(welcome.meta)
            if isinstance(part, Deferred):
                self.deferred = part
            else:
                self.part = part
                self.rounds_done = state.load(self.settings.workdir, self.part, self.stream)
            idle, unsent, instruction = self.hello(), True, None  # says it is ready
            while True:
                if instruction is None:
                    instruction = self.request(idle, {MessageKind.ROUND_START, MessageKind.ROUND_END},
                                               send=unsent)
                    unsent = False
                if instruction.kind is MessageKind.ROUND_END:
                    if instruction.meta.get("finished"):
                        log.info("%s: the run is finished", self.me)
                        return self.rounds_done
                    instruction = None  # the coordinator stopped early: wait for it to return
                    continue
                if self.part is None:
                    self.make_part(instruction)
                try:
                    idle, unsent, instruction = self.train_round(instruction), False, None
                except Interrupted as i:
                    instruction = i.envelope
                except WorkerLost:
                    # the round again from its start, on whichever worker the broker picks:
                    # the new copy sees the same batches from the same trunk, so it is the same
                    log.warning("%s: its split-server worker stopped answering; round %d starts "
                                "over on another", self.me, instruction.round)
        finally:
            self._stop.set()
            if beat.is_alive():
                beat.join(timeout=5)  # not mid-publish while the process winds down

    def measure_link(self, round_: int) -> None:
        """Every `relink_every` rounds, after the upload (the coordinator is aggregating): the
        link again, for the next upload to report. A failed probe is logged, not fatal."""
        d = self.deferred
        if d is None or d.relink is None or not d.relink_every or round_ % d.relink_every:
            return
        try:
            self.link_now = d.relink()
            log.info("%s: link now up %.1f MB/s, down %.1f MB/s, rtt %.1f ms", self.me,
                     self.link_now["up_bytes_per_s"] / 1e6, self.link_now["down_bytes_per_s"] / 1e6,
                     self.link_now["rtt_s"] * 1e3)
        except (TransportError, OSError) as e:
            log.warning("%s: the link probe failed (%s); the last figures stand", self.me, e)

    def make_part(self, start: Envelope) -> None:
        """Build the planned part at the cut and rank the first ROUND_START names for it."""
        raw = start.meta.get("plan")
        try:
            choice = None if raw is None else NodePlan.model_validate(raw)
        except ValueError as e:
            raise ProtocolError(f"the coordinator's plan for {self.me} is malformed: {e}") from e
        self.part = self.deferred.make(choice)
        self.rounds_done = state.load(self.settings.workdir, self.part, self.stream)

    def train_round(self, start: Envelope) -> Envelope:
        """Run one round's steps and send the adapter upload; returns it (re-sent while idle)."""
        part, stream, r = self.part, self.stream, start.round
        if self.snapshot and self.snapshot.round == r:
            # the round is repeated: rewind to its start
            self.snapshot.restore(part, stream)
            shared, self.version, residual = self.snapshot.sync
            # copies: this attempt must not change what a further repeat rewinds to
            self.shared, self.uplink.residual = shared and dict(shared), dict(residual)
        else:
            self.snapshot = state.RoundSnapshot.take(r, part, stream)
            self.snapshot.sync = (self.shared, self.version, dict(self.uplink.residual))
        start = self.base_of(start)
        self.attempt = start.meta.get("attempt")
        self.step_topic = protocol.topic_step(self.run_id, self.me) if self.workers else None
        # an interrupted step may have left gradients behind (back blocks done, front not)
        part.optimizer.zero_grad(set_to_none=True)
        part.load_adapter(self.shared)
        steps, tokens, loss_sum = int(start.meta["steps"]), 0, 0.0
        started = time.monotonic()
        for s in range(steps):
            batch = next(stream)
            at = Address(self.run_id, self.me, r, s)
            up = part.forward_front(batch)
            if part.cut.mode is SplitMode.VANILLA:
                down = self.ask(step_envelope(up, at, self.codec), MessageKind.GRADIENT_DOWN, r, s)
                loss = down.loss
            else:
                trunk = self.ask(step_envelope(up, at, self.codec), MessageKind.ACTIVATION_DOWN, r, s)
                grad_up, loss = part.forward_back(trunk)
                down = self.ask(step_envelope(grad_up, at, self.codec), MessageKind.GRADIENT_DOWN, r, s)
            part.backward_front(down)
            part.step()
            tokens += batch.tokens
            loss_sum += loss
        self.rounds_done = r
        delta, _ = self.uplink.delta(part.adapter(), self.shared)
        link = {"link": self.link_now} if self.link_now else {}
        upload = adapter_envelope(MessageKind.ADAPTER_UP, delta, Address(self.run_id, self.me, r),
                                  {"tokens": tokens, "loss": loss_sum / steps, "attempt": self.attempt,
                                   "version": self.version, "seconds": time.monotonic() - started,
                                   "layers": part.selector.history[-8:],
                                   "cache": part.prefix.cache.stats.as_dict() if part.prefix.cache else {},
                                   "prefix_backend": part.prefix.provider, **link},
                                  self.uplink.stages)
        self.send(upload)
        # Saved after the upload is on its way, so the disk writes (fsync) overlap the
        # coordinator's aggregation instead of lengthening every round. A crash in between
        # costs only a repeat of this round's batches after a restart.
        state.save(self.settings.workdir, r, part, stream)
        log.info("%s: round %d done, loss %.4f", self.me, r, loss_sum / steps)
        self.measure_link(r)
        return upload

