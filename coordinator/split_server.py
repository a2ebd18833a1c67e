"""The split server of a round: one trunk copy that serves every agent in a fixed order.

SplitFed-V2 trains one server copy in turn, so the trunk's work has an order; here it is
step-major, agent-minor (step 0 of every agent in id order, then step 1, ...), the same order
as the in-process simulation, which makes a distributed run reproduce the simulation exactly.
Agents compute and send ahead; an activation that arrives before its turn waits in a buffer of
at most one message per agent (an agent cannot send step s+1 before step s is answered).

Every reply is kept until the agent's next request, so a request sent again after a lost
message or a reconnect gets the same reply and is never applied twice.
"""

from __future__ import annotations

import time
from collections import deque

from fsl_edge.compression import StepCodec
from fsl_edge.config import SplitMode
from fsl_edge.errors import ProtocolError
from fsl_edge.messages import ActivationUp, GradientUp
from fsl_edge.prefix import MissingKeys
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.step import ServerPart
from fsl_edge.wire import Address, step_envelope

Reply = tuple[str, Envelope]  # (agent, envelope to send it)


class SplitServer:
    def __init__(self, part: ServerPart, run: str, codec: StepCodec):
        self.part, self.run, self.codec = part, run, codec
        self.round = -1
        self.order: deque[tuple[int, str]] = deque()
        self.buffered: dict[str, tuple[int, ActivationUp]] = {}
        self.awaiting: tuple[int, str] | None = None  # u-shape: forward done, gradient due
        self.replies: dict[tuple[str, MessageKind, int], Envelope] = {}  # (agent, request, step)
        self.steps_done: dict[str, int] = {}
        self.turn_since = time.monotonic()  # when the agent at the head of the order got its turn

    def begin_round(self, round_: int, agents: list[str], steps: int) -> None:
        self.round = round_
        self.order = deque((s, a) for s in range(steps) for a in sorted(agents))
        self.turn_since = time.monotonic()
        self.buffered.clear()
        self.replies.clear()
        self.steps_done = {a: 0 for a in agents}
        if self.awaiting:
            self.part.drop_pending(self.awaiting)
        self.awaiting = None

    @property
    def finished(self) -> bool:
        return not self.order

    def waiting_on(self) -> str | None:
        """The agent whose step the trunk waits for (its activation or its gradient)."""
        return self.order[0][1] if self.order else None

    def drop(self, agent: str) -> list[Reply]:
        """Take an agent out of the round (gone offline); the others move on."""
        self.order = deque(e for e in self.order if e[1] != agent)
        self.turn_since = time.monotonic()
        self.buffered.pop(agent, None)
        if self.awaiting and self.awaiting[1] == agent:
            self.part.drop_pending(self.awaiting)
            self.awaiting = None
        return self._progress()

    def on_request(self, agent: str, env: Envelope, message) -> list[Reply]:
        """Handle an ACTIVATION_UP or GRADIENT_UP of this round (its decoded, validated
        `message`); returns the replies to send."""
        cached = self.replies.get((agent, env.kind, env.step))
        if cached is not None:
            return [(agent, cached)]  # a resend: same answer, nothing applied again
        if agent not in self.steps_done:
            raise ProtocolError(f"agent {agent} is not in round {self.round}")
        if env.kind is MessageKind.ACTIVATION_UP:
            if env.step != self.steps_done[agent]:
                raise ProtocolError(f"activation for step {env.step} from {agent}, "
                                    f"expected step {self.steps_done[agent]}")
            self.buffered[agent] = (env.step, message)
            return self._progress()
        if env.kind is MessageKind.GRADIENT_UP:
            if self.awaiting != (env.step, agent):
                raise ProtocolError(f"gradient for step {env.step} from {agent} was not expected")
            return self._backward(agent, env.step, message)
        raise ProtocolError(f"{env.kind.name} is not a split-server request")

    def _progress(self) -> list[Reply]:
        """Run the trunk forward for as many queued steps as are ready, in order."""
        replies = []
        while self.order and self.awaiting is None:
            step, agent = self.order[0]
            if self.buffered.get(agent, (None,))[0] != step:
                break
            _, up = self.buffered.pop(agent)
            try:
                out = self.part.forward((step, agent), up, site=agent)
            except MissingKeys:
                # it sent keys for activations this server no longer holds (restarted, or
                # dropped them at its bound): ask for them; the answer is not kept, so the
                # request with the activations is served as new
                kind = MessageKind.GRADIENT_DOWN if self.part.cut.mode is SplitMode.VANILLA \
                    else MessageKind.ACTIVATION_DOWN
                replies.append((agent, Envelope(kind, self.run, agent, self.round, step,
                                                meta={"need_hidden": True})))
                break
            kind_in = MessageKind.ACTIVATION_UP
            if self.part.cut.mode is SplitMode.VANILLA:
                self.part.step()
                self._complete(step, agent)
            else:
                self.awaiting = (step, agent)
            replies.append(self._reply(agent, kind_in, step, out))
        return replies

    def _backward(self, agent: str, step: int, grad: GradientUp) -> list[Reply]:
        down = self.part.backward((step, agent), grad)
        self.part.step()
        self.awaiting = None
        self._complete(step, agent)
        return [self._reply(agent, MessageKind.GRADIENT_UP, step, down), *self._progress()]

    def _complete(self, step: int, agent: str) -> None:
        assert self.order and self.order[0] == (step, agent), "trunk steps must run in order"
        self.order.popleft()
        self.steps_done[agent] = step + 1
        self.turn_since = time.monotonic()

    def _reply(self, agent: str, request: MessageKind, step: int, message) -> Reply:
        env = step_envelope(message, Address(self.run, agent, self.round, step), self.codec)
        # keep only the latest reply per agent: an older request cannot be outstanding
        self.replies = {k: v for k, v in self.replies.items() if k[0] != agent}
        self.replies[(agent, request, step)] = env
        return agent, env
