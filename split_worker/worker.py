"""A split-server worker's state machine: the sites it serves this round, one trunk copy each.

The broker hands a round's first step of a site to one worker (a shared subscription); that
worker serves the site for the rest of the round, keeping the site's trunk copy
(fsl_edge.trunk_copies), and after the site's last step sends the copy to the coordinator, which
averages the copies by tokens. The trunk of the round comes from the coordinator (topic_trunk);
requests that arrive before it wait.

While a u-shape step waits for its site's gradient (the site runs its back blocks and head),
the worker serves the other sites: each copy is its own set of parameters, and the waiting
step's graph keeps its own. A gradient that never comes (the agent went away, or took another
worker's answer to a resent first step) is given up after `give_up_s`, freeing its graph.

Replies are kept, one per site, so a resent request gets the same answer and is applied once.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from fsl_edge import protocol
from fsl_edge.compression import StepCodec
from fsl_edge.config import SplitMode
from fsl_edge.errors import ProtocolError
from fsl_edge.prefix import MissingKeys
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.step import ServerPart
from fsl_edge.trunk_copies import TrunkCopies
from fsl_edge.wire import Address, adapter_envelope, adapter_state, step_envelope, step_message

log = logging.getLogger("fsl_edge.split_worker")

Out = tuple[str, Envelope]  # (topic, envelope) to publish
MAX_WAITING = 4096  # requests held for a trunk that has not come


class Worker:
    def __init__(self, part: ServerPart, run: str, worker_id: str, codec: StepCodec,
                 give_up_s: float = 15.0):
        self.part, self.run, self.id, self.codec = part, run, worker_id, codec
        self.copies = TrunkCopies(part)
        self.give_up_s = give_up_s
        self.round, self.attempt, self.steps = -1, None, 0  # the trunk held
        self.waiting: deque[tuple[str, Envelope]] = deque()
        self.pending: dict[str, tuple[int, float]] = {}  # u-shape: site -> (step, since) whose
        # gradient is due
        self.steps_done: dict[str, int] = {}
        # site -> its last request's (kind, step) and what answered it (after its last step,
        # its copy for the coordinator too): a resend gets it all again
        self.replies: dict[str, tuple[MessageKind, int, list[Out]]] = {}
        self.served = 0  # steps served, all rounds
        self.asked = -1e9  # when it last asked for the trunk

    def hello(self) -> Out:
        """Say it is there: the coordinator answers with the running round's trunk."""
        return (protocol.topic_worker_up(self.run, self.id),
                Envelope(MessageKind.HELLO, self.run, self.id, max(self.round, 0),
                         meta={"attempt": self.attempt}))

    # --- from the coordinator ---
    def on_trunk(self, env: Envelope) -> list[Out]:
        """The round's trunk (round, attempt, steps): every copy starts again from it."""
        attempt = env.meta.get("attempt")
        if not isinstance(attempt, str) or (env.round, attempt) == (self.round, self.attempt):
            return []  # malformed, or the trunk held (sent again for a newer worker)
        state = adapter_state(env, self.part.adapter(), protocol.Limits().max_tensor_bytes)
        steps = env.meta.get("steps")
        if not isinstance(steps, int) or steps < 1:
            raise ProtocolError(f"the trunk of round {env.round} names no steps: {steps!r}")
        for site in list(self.pending):
            self._forget(site)
        # requests of an attempt given up wait for nothing: drop them
        self.waiting = deque((s, e) for s, e in self.waiting
                             if e.meta.get("attempt") == attempt or e.round > env.round)
        self.copies.begin_round(state)
        self.round, self.attempt, self.steps = env.round, attempt, steps
        self.steps_done.clear()
        self.replies.clear()
        log.info("worker %s: round %d's trunk (attempt %s)", self.id, env.round, attempt)
        return self._serve_waiting()

    # --- from the agents ---
    def on_request(self, site: str, env: Envelope) -> list[Out]:
        """An ACTIVATION_UP or GRADIENT_UP of `site`: the replies (and, after its last step,
        its trunk copy for the coordinator), then those of the requests it let through."""
        return self._handle(site, env) + self._serve_waiting()

    def _handle(self, site: str, env: Envelope) -> list[Out]:
        if env.kind not in (MessageKind.ACTIVATION_UP, MessageKind.GRADIENT_UP):
            raise ProtocolError(f"{env.kind.name} is not a split-server request")
        kept = self.replies.get(site)
        if kept and kept[:2] == (env.kind, env.step) and env.meta.get("attempt") == self.attempt:
            return list(kept[2])  # a resend: the same answer
        if env.meta.get("attempt") != self.attempt:
            return self._wait(site, env)
        return self._serve(site, env)

    def tick(self) -> list[Out]:
        """Give up the gradients that are overdue (their graphs are freed)."""
        now = time.monotonic()
        for site, (step, since) in list(self.pending.items()):
            if now - since > self.give_up_s:
                log.warning("worker %s: no gradient from %s for step %d in %.0f s; given up",
                            self.id, site, step, self.give_up_s)
                self._forget(site)
                self.copies.restart(site)  # half a step applied to nothing: its copy starts over
                self.steps_done.pop(site, None)
                self.replies.pop(site, None)
        return []

    def _wait(self, site: str, env: Envelope) -> list[Out]:
        if env.round < self.round:
            return []  # a round this worker has moved past
        if len(self.waiting) >= MAX_WAITING:
            raise ProtocolError(f"worker {self.id} holds {MAX_WAITING} waiting requests")
        self.waiting.append((site, env))
        if time.monotonic() - self.asked < 1.0:
            return []  # the trunk was just asked for
        # a round (or a repeat of one) whose trunk this worker lacks: on its way, or missed
        self.asked = time.monotonic()
        return [self.hello()]

    def _serve_waiting(self) -> list[Out]:
        """Serve the waiting requests that can be now, in the order they came, until none can."""
        out, progress = [], True
        while progress and self.waiting:
            progress = False
            held, self.waiting = self.waiting, deque()
            for site, env in held:
                before = len(self.waiting)
                try:
                    got = self._handle(site, env)
                except Exception as e:  # noqa: BLE001 - one bad request must not cost the others
                    log.warning("worker %s: dropped a request of %s: %s", self.id, site, e)
                    got = []
                if len(self.waiting) == before:  # not put back: served or dropped
                    progress = True
                    out += got
        return out

    def _serve(self, site: str, env: Envelope) -> list[Out]:
        message = step_message(env, protocol.Limits().max_tensor_bytes)
        if env.kind is MessageKind.GRADIENT_UP:
            if self.pending.get(site, (None,))[0] != env.step:
                raise ProtocolError(f"gradient for step {env.step} from {site} was not expected")
            self.copies.use(site)
            down = self.part.backward((env.step, site), message)
            del self.pending[site]
            return self._stepped(site, env, down)
        done = self.steps_done.get(site, 0)
        if env.step == 0 and (done > 0 or site in self.pending):
            # it started its round over (a restart): so does its copy
            self._forget(site)
            self.copies.restart(site)
            done = 0
        if env.step != done:
            raise ProtocolError(f"activation for step {env.step} from {site}, expected step {done}")
        if done == 0:
            log.info("worker %s serves %s in round %d", self.id, site, env.round)
        message.validate(self.part.parts.hidden_size)
        # every trunk block trains in every epoch here (per-site needs selection 'all'), so a
        # site's epoch is taken as it says: a worker new to the site has not seen its last one
        self.part.site_epochs[site] = max(self.part.site_epochs.get(site, 0), message.epoch)
        self.copies.use(site)
        self.steps_done[site] = done
        try:
            out = self.part.forward((env.step, site), message, site=site)
        except MissingKeys:
            # keys for activations this worker does not hold (another worker served it before):
            # ask for the activations; the answer is not kept, so the next request is new
            kind = MessageKind.GRADIENT_DOWN if self.part.cut.mode is SplitMode.VANILLA \
                else MessageKind.ACTIVATION_DOWN
            return [(protocol.topic_down(self.run, site),
                     self._stamp(Envelope(kind, self.run, site, env.round, env.step,
                                          meta={"need_hidden": True})))]
        if self.part.cut.mode is SplitMode.VANILLA:
            return self._stepped(site, env, out)
        self.pending[site] = (env.step, time.monotonic())
        return [self._reply(site, env, out)]

    def _stepped(self, site: str, env: Envelope, down) -> list[Out]:
        """The step's trunk update is done: reply, and after the last step send the copy."""
        self.part.step()
        self.steps_done[site] = env.step + 1
        self.served += 1
        out = [self._reply(site, env, down)]
        if env.step + 1 == self.steps:
            copy = adapter_envelope(MessageKind.ADAPTER_UP, self.copies.state(site),
                                    Address(self.run, site, self.round),
                                    {"attempt": self.attempt, "worker": self.id,
                                     "steps": self.steps})
            out.append((protocol.topic_worker_up(self.run, self.id), copy))
            self.replies[site] = (env.kind, env.step, out)
        return out

    def _reply(self, site: str, env: Envelope, message) -> Out:
        reply = self._stamp(step_envelope(message, Address(self.run, site, env.round, env.step),
                                          self.codec))
        self.replies[site] = (env.kind, env.step, [(protocol.topic_down(self.run, site), reply)])
        return protocol.topic_down(self.run, site), reply

    def _stamp(self, env: Envelope) -> Envelope:
        env.meta["worker"] = self.id  # the agent sends the rest of its round here
        return env

    def _forget(self, site: str) -> None:
        """Free `site`'s step in flight, if it has one."""
        if site in self.pending:
            self.part.drop_pending((self.pending.pop(site)[0], site))
