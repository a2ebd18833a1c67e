"""The planner in the coordinator: the profiles agents send in their ready HELLO, the plan for
the first round's agents, and each agent's predicted vs measured seconds per step.

The coordinator is the split server: its own profile is measured here, compute only (it sits
next to the broker, and the delay model leaves its link out). An agent whose profile is missing
or malformed is left out of the plan and takes its pin, else the run's split and rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from pydantic import ValidationError

from fsl_edge.config import LearningSettings
from fsl_edge.delay import ModelSpec, Workload
from fsl_edge.errors import ConfigError, ProtocolError
from fsl_edge.planner import Plan, plan
from fsl_edge.profile import NodeProfile, device_info, measure_compute

log = logging.getLogger("fsl_edge.coordinator")
LOCAL_BYTES_PER_S = 1e12  # the server's link: not in the delay model, but a profile needs one
MAX_TEXT = 256  # device and model names are shown in the status: keep them bounded


def parse_profile(meta: Mapping) -> NodeProfile | None:
    """The profile in a HELLO's meta (None: it sent none); ProtocolError saying what is wrong."""
    raw = meta.get("profile")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProtocolError(f"the profile is a {type(raw).__name__}, not an object")
    try:
        profile = NodeProfile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "profile"
        raise ProtocolError(f"the profile's {where}: {first['msg']} "
                            f"({e.error_count()} problem(s))") from e
    for name, value in profile:
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"the profile's {name} is {value}: a measurement must be finite")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ProtocolError(f"the profile's {name} is {len(value)} characters (at most {MAX_TEXT})")
    return profile


def server_profile(model: torch.nn.Module, batch: int, seq: int, repeats: int = 3) -> NodeProfile:
    """This process as the split server: its device and compute on the run's model."""
    device = next(model.parameters()).device
    kind, name, memory = device_info(device)
    block_s, head_s = measure_compute(model, batch, seq, repeats)
    return NodeProfile(device_kind=kind, device_name=name, memory_bytes=memory, block_s=block_s,
                       head_s=head_s, ref_batch=batch, ref_seq=seq, up_bytes_per_s=LOCAL_BYTES_PER_S,
                       down_bytes_per_s=LOCAL_BYTES_PER_S, rtt_s=0.0)


class Planning:
    """The agents' profiles, and the one plan made when the first round's agents are known."""

    def __init__(self, training: LearningSettings, model: torch.nn.Module):
        self.training, self.model = training, model
        self.enabled = training.planner.enabled
        self.profiles: dict[str, NodeProfile] = {}
        self.plan: Plan | None = None
        self.tried = False

    def take(self, agent: str, meta: Mapping) -> None:
        """Keep the profile of an agent's HELLO (the latest wins); ProtocolError if malformed."""
        profile = parse_profile(meta) if self.enabled else None
        if profile is not None:
            self.profiles[agent] = profile

    def make(self, agents: list[str]) -> dict | None:
        """Plan the agents that sent a profile, once: the plan for the status (see
        Status.planner); None without the planner or any profile."""
        if not self.enabled or self.tried:
            return None
        self.tried = True
        nodes = {a: self.profiles[a] for a in agents if a in self.profiles}
        if not nodes:
            log.warning("planner: none of %s sent a profile; every agent takes its pin or the "
                        "run's split", ", ".join(agents))
            return None
        training, train = self.training, self.training.train
        settings = training.planner.model_copy(update={"pins": {
            a: p for a, p in training.planner.pins.items() if a in nodes}})
        if training.prefix.frozen:  # the frozen prefix must fit in the site's front blocks
            n = ModelSpec.from_model(self.model, training.lora.target_modules).n_blocks
            fronts = settings.fronts or tuple(range(1, n - 1))
            settings = settings.model_copy(update={"fronts": tuple(
                a for a in fronts if a == training.prefix.frozen or
                (a > training.prefix.frozen and not training.prefix.send_keys))})
        work = Workload(mode=training.split.mode, batch=train.batch_size, seq=train.max_len,
                        steps=train.steps, server_rank=training.lora.rank)
        try:
            spec = ModelSpec.from_model(self.model, training.lora.target_modules)
            self.plan = plan(spec, work, nodes, server_profile(self.model, train.batch_size,
                                                               train.max_len), settings)
        except ConfigError as e:
            log.error("planner: no plan (%s); every agent takes its pin or the run's split", e)
            return None
        log.info("planner: makespan %.3f s per round, bottleneck %s; %s", self.plan.makespan_s,
                 self.plan.bottleneck, ", ".join(f"{a} {c.a}/{c.b} r{c.rank}"
                                                  for a, c in self.plan.nodes.items()))
        shown = self.plan.model_dump(mode="json")
        for agent, node in shown["nodes"].items():
            node["measured_step_s"] = None
            p = self.profiles.get(agent)
            if p is not None:  # what the plan was made from, beside what is measured later
                node["planned_link"] = {"up_bytes_per_s": p.up_bytes_per_s, "rtt_s": p.rtt_s,
                                        "down_bytes_per_s": p.down_bytes_per_s,
                                        "measured_at": p.measured_at}
        return shown

    def start_meta(self, agent: str) -> dict:
        """What a ROUND_START tells the agent of its plan: its choice, or null (not planned)."""
        if not self.enabled:
            return {}
        choice = self.plan.nodes.get(agent) if self.plan is not None else None
        return {"plan": None if choice is None else choice.model_dump(mode="json")}


LINK_KEYS = ("up_bytes_per_s", "down_bytes_per_s", "rtt_s", "measured_at")


def record_link(shown: dict | None, agent: str, link) -> None:
    """An agent's link as it re-measured it (planner.relink_every), next to its plan; figures
    that are not finite, positive numbers are left out (it is shown, not used)."""
    if shown is None or agent not in shown["nodes"] or not isinstance(link, dict):
        return
    ok = {k: float(link[k]) for k in LINK_KEYS if isinstance(link.get(k), (int, float))
          and not isinstance(link.get(k), bool) and 0 <= link[k] < 1e18}
    if len(ok) == len(LINK_KEYS):
        shown["nodes"][agent]["link"] = ok


def record(shown: dict | None, agent: str, seconds: float, steps: int) -> None:
    """An agent's round as the coordinator saw it (start to upload), per step, next to its plan."""
    if shown is not None and agent in shown["nodes"]:
        shown["nodes"][agent]["measured_step_s"] = seconds / steps
