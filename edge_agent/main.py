"""`fsl-edge agent`: connect, get the run's settings from the coordinator, train when told."""

from __future__ import annotations

import logging
import time

import torch

from fsl_edge import protocol
from fsl_edge.auth import agent_authenticator
from fsl_edge.data import BatchStream, examples_digest, load_samples, pad_id_of, tokenize
from fsl_edge.models import load
from fsl_edge.nodes import node_setup
from fsl_edge.planner import NodePlan
from fsl_edge.profile import ProfileSettings, measure_link, profile_node
from fsl_edge.config import LearningSettings
from fsl_edge.simulation import site_seed
from fsl_edge.split import discover
from fsl_edge.step import SitePart, party_options
from fsl_edge.transport import BrokerLogin, MqttLink

from .agent import Agent, Deferred
from .settings import AgentSettings

log = logging.getLogger("fsl_edge.edge_agent")


def builder(settings: AgentSettings):
    """Load the model and the site's data once the coordinator has said how to train."""

    def build(welcome: dict) -> tuple[SitePart | Deferred, BatchStream]:
        training = LearningSettings.model_validate(welcome["training"])
        train = training.train
        model = settings.model or welcome["model"]
        loaded = load(model, device=settings.device, quantize=training.lora.quantize)
        examples = tokenize(load_samples(settings.data), loaded.tokenizer, train.max_len)

        def make(choice: NodePlan | None) -> SitePart:
            torch.manual_seed(train.seed)
            # its own cut and rank: planned, else pinned for it by name, else the run's
            # (validated like the run's)
            setup = node_setup(training, discover(loaded.model).n_blocks, settings.agent_id, choice)
            cut = setup.cut
            part = SitePart(loaded.model, cut, setup.lora, train.lr, **party_options(training),
                            cache=(settings.cache_dir or settings.workdir / "cache", settings.cache_bytes))
            part.data_digest = examples_digest(examples)
            part.prefix.prepare(training.prefix.frozen)  # the LoRA-free prefix: the same all run
            log.info("%s: %d examples, cut %d/%d (%s), rank %d%s", settings.agent_id, len(examples),
                     cut.a, cut.b, cut.mode.value, setup.lora.rank, " (planned)" if choice else "")
            return part

        stream = BatchStream(examples, train.batch_size, site_seed(train.seed, settings.agent_id),
                             pad_id_of(loaded.tokenizer))
        if not training.planner.enabled:
            return make(None), stream
        # the plan needs this node's speed and link: measured on the loaded model (before LoRA)
        rt = settings.runtime
        profile = profile_node(loaded.model, rt.broker, protocol.topic_probe(rt.run_id, settings.agent_id),
                               ProfileSettings(batch=train.batch_size, seq=train.max_len),
                               BrokerLogin.from_env(), model)
        log.info("%s: profiled: block %.4f s, up %.1f MB/s, down %.1f MB/s, rtt %.1f ms",
                 settings.agent_id, profile.block_s, profile.up_bytes_per_s / 1e6,
                 profile.down_bytes_per_s / 1e6, profile.rtt_s * 1e3)
        probe = protocol.topic_probe(rt.run_id, settings.agent_id)

        def relink() -> dict:
            up, down, rtt = measure_link(rt.broker, probe, login=BrokerLogin.from_env())
            return {"up_bytes_per_s": up, "down_bytes_per_s": down, "rtt_s": rtt,
                    "measured_at": time.time()}

        return Deferred(profile, make, relink, training.planner.relink_every), stream

    return build


def run_agent(settings: AgentSettings) -> int:
    """Run the agent until the coordinator finishes the run; returns the rounds it trained."""
    rt = settings.runtime
    status_topic = protocol.topic_status(rt.run_id, settings.agent_id)
    # with a node key it signs what it sends and obeys only what the coordinator signed
    authenticator = agent_authenticator(settings.agent_id)
    if authenticator is None:
        log.warning("%s: no node key configured (FSL_NODE_KEY): messages are neither signed nor "
                    "checked", settings.agent_id)
    link = MqttLink(rt.broker, f"fsl-{rt.run_id}-{settings.agent_id}",
                    [protocol.topic_down(rt.run_id, settings.agent_id),
                     protocol.topic_broadcast(rt.run_id)],
                    will=(status_topic, protocol.STATUS_OFFLINE),
                    online=(status_topic, protocol.STATUS_ONLINE), max_packet=rt.max_packet,
                    bounds=rt.bounds, login=BrokerLogin.from_env(), authenticator=authenticator)
    link.start()
    try:
        return Agent(settings, link, builder(settings)).run()
    finally:
        link.publish_status(status_topic, protocol.STATUS_OFFLINE)
        link.stop()
