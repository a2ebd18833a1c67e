"""`fsl-edge worker`: one split-server worker of a run whose trunk is copied per site
(training.split.server "per-site"). Any number of them serve the run; the broker shares the
sites out among them. The coordinator stays the one aggregator and ledger writer."""

from __future__ import annotations

import logging
import os
import socket

from fsl_edge import protocol
from fsl_edge.auth import WORKER_PREFIX, coordinator_authenticator
from fsl_edge.compression import StepCodec
from fsl_edge.config import ServerCopies
from fsl_edge.coordinator.settings import CoordinatorSettings
from fsl_edge.errors import CodecError, ConfigError, ProtocolError
from fsl_edge.models import load
from fsl_edge.protocol import MessageKind
from fsl_edge.split import discover
from fsl_edge.step import ServerPart, party_options
from fsl_edge.transport import BrokerLogin, MqttLink, Received
from fsl_edge.trunk_copies import check_per_site
from fsl_edge.wire import raw_bytes

from .worker import Out, Worker

log = logging.getLogger("fsl_edge.split_worker")
SHARE_GROUP_ENV = "FSL_SHARE_GROUP"


def default_worker_id() -> str:
    """The host's name (a pod's name in Kubernetes), made a valid id."""
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return (name.lstrip("_.-") or "worker")[:64]


def share_group(environ=None) -> str:
    """The workers' shared-subscription group: FSL_SHARE_GROUP (a deployment's secret), else
    the protocol's default (local runs, where only this machine reaches the broker)."""
    env = os.environ if environ is None else environ
    group = env.get(SHARE_GROUP_ENV) or protocol.SHARE_GROUP
    if not protocol.valid_id(group):
        raise ConfigError(f"{SHARE_GROUP_ENV} {group!r} is not a valid group name: 1-64 of "
                          "[A-Za-z0-9_.-], starting alphanumeric")
    return group


def check_runs_workers(settings: CoordinatorSettings) -> None:
    if settings.training.split.server is not ServerCopies.PER_SITE:
        raise ConfigError("this run's trunk is one shared copy (training.split.server 'shared'), "
                          "which the coordinator serves itself: split-server workers serve "
                          "'per-site' runs")
    check_per_site(settings.training)


def dispatch(worker: Worker, received: Received) -> tuple[list[Out], bool]:
    """The worker's answers to one message, and whether the run has finished."""
    topic, env = received.topic, received.envelope
    if env.run_id != worker.run:
        raise ProtocolError(f"a message of run {env.run_id!r} on run {worker.run!r}'s topic")
    if topic.channel == "trunk" and env.kind is MessageKind.ADAPTER_DOWN:
        return worker.on_trunk(env), False
    if topic.channel == "step":
        if env.agent_id != topic.agent:
            raise ProtocolError(f"a step of {env.agent_id!r} on {topic.agent!r}'s topic")
        return worker.on_request(topic.agent, env), False
    if topic.channel == "broadcast":
        if env.kind is MessageKind.HELLO:  # a (re)started coordinator: ask for its trunk
            return [worker.hello()], False
        if env.kind is MessageKind.ROUND_END:
            return [], env.meta.get("finished") is True
    return [], False


STEP_KINDS = (MessageKind.ACTIVATION_UP, MessageKind.ACTIVATION_DOWN, MessageKind.GRADIENT_UP,
              MessageKind.GRADIENT_DOWN)


class SiteTraffic:
    """Each site's step traffic through this worker, handed to the coordinator with the site's
    copy (its /status counts what the sites and workers exchange, as when it serves the steps)."""

    def __init__(self, max_sites: int = 4096):
        self.books: dict[str, dict[str, list[int]]] = {}  # site -> kind -> [messages, bytes, raw]
        self.max_sites = max_sites

    def count(self, site: str, env, size: int) -> None:
        if env.kind not in STEP_KINDS:
            return
        if site not in self.books and len(self.books) >= self.max_sites:
            return  # names a sender may invent: stay bounded (it only shows, nothing depends on it)
        book = self.books.setdefault(site, {}).setdefault(env.kind.name.lower(), [0, 0, 0])
        book[0], book[1], book[2] = book[0] + 1, book[1] + size, book[2] + raw_bytes(env)

    def take(self, site: str) -> dict[str, list[int]]:
        return self.books.pop(site, {})

    def keep(self, sites) -> None:
        """Forget every site but `sites` (a new round: counts of unfinished ones are stale)."""
        self.books = {s: b for s, b in self.books.items() if s in sites}


def run_worker(settings: CoordinatorSettings, worker_id: str, stop=lambda: False,
               until_finished: bool = False) -> int:
    """Serve until `stop()` (or, `until_finished`, the run's end); returns the steps served."""
    check_runs_workers(settings)
    rt, me = settings.runtime, protocol.check_id(worker_id, "worker id")
    authenticator = coordinator_authenticator(WORKER_PREFIX + me, settings.require_auth)
    link = MqttLink(rt.broker, f"fsl-{rt.run_id}-worker-{me}",
                    [protocol.topic_shared_steps(rt.run_id, share_group()), protocol.topic_worker_steps(rt.run_id, me),
                     protocol.topic_trunk(rt.run_id), protocol.topic_broadcast(rt.run_id)],
                    max_packet=rt.max_packet, bounds=rt.bounds, login=BrokerLogin.from_env(),
                    authenticator=authenticator, persistent=False)
    model = load(settings.model, device=settings.device,
                 quantize=settings.training.lora.quantize).model
    training = settings.training
    cut = training.split.cut(discover(model).n_blocks)
    training.check_prefix(cut)
    part = ServerPart(model, cut, training.lora, training.train.lr, **party_options(training))
    # a step in flight no longer holds anyone up (the others are served meanwhile): it is
    # given up only to free an orphan's graph, well after its site would have given up itself
    worker = Worker(part, rt.run_id, me, StepCodec(training.compression.pipelines()),
                    give_up_s=2 * rt.worker_lost_s)
    link.start()
    try:
        link.publish(*worker.hello())
        log.info("worker %s of run %s ready", me, rt.run_id)
        finished = False
        books = SiteTraffic()
        while not stop() and not (until_finished and finished):
            received = link.get(timeout=0.1)
            out: list[Out] = []
            if received is not None:
                try:
                    out, done = dispatch(worker, received)
                    finished = finished or done
                except (ProtocolError, CodecError) as e:
                    log.warning("worker %s: dropped a message on %s: %s", me,
                                received.topic.channel, e)
                except Exception:  # noqa: BLE001 - one site's bad step must not end the worker
                    log.exception("worker %s: internal error on a message of %s", me,
                                  received.topic.agent)
                if received.topic.channel == "trunk":
                    books.keep(worker.copies.copies)  # sites of rounds gone: their counts go
            if received is not None and received.topic.channel == "step":
                books.count(received.topic.agent, received.envelope, received.size)
            out += worker.tick()
            for topic, env in out:
                if env.kind is MessageKind.ADAPTER_UP:  # a site's copy: with its round's traffic
                    env.meta["traffic"] = books.take(env.agent_id)
                    link.publish(topic, env)
                else:
                    books.count(env.agent_id, env, link.publish(topic, env))
        return worker.served
    finally:
        link.stop()
