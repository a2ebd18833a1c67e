"""The planner in the coordinator without a network: the HELLO's profile is validated (a bad one
is refused with its reason), the plan is made once and tells each agent its choice, and
`fsl-edge status` shows it next to the measured step times."""

import math

import pytest
from rich.console import Console

from fsl_edge.cli.status import planner_table, render
from fsl_edge.config import LearningSettings
from fsl_edge.coordinator.planning import Planning, parse_profile, record
from fsl_edge.errors import ProtocolError
from fsl_edge.planner import NodePlan
from fsl_edge.status import Status
from fsl_edge.tiny import tiny_model

PROFILE = {"device_kind": "cpu", "device_name": "test cpu", "memory_bytes": 8 << 30,
           "block_s": 0.002, "head_s": 0.001, "ref_batch": 4, "ref_seq": 32,
           "up_bytes_per_s": 1e8, "down_bytes_per_s": 1e8, "rtt_s": 0.001,
           "model": "tiny-random-llama", "measured_at": 1.0}


def test_a_well_formed_profile_is_taken_and_none_is_none():
    assert parse_profile({"ready": True}) is None
    profile = parse_profile({"profile": PROFILE})
    assert profile.block_s == 0.002 and profile.ref_tokens == 128


@pytest.mark.parametrize("bad, reason", [
    ("fast", "is a str, not an object"),
    ({**PROFILE, "block_s": 0}, r"block_s: Input should be greater than 0"),
    ({**PROFILE, "block_s": "slow"}, r"block_s: Input should be a valid number"),
    ({k: v for k, v in PROFILE.items() if k != "up_bytes_per_s"}, r"up_bytes_per_s: Field required"),
    ({**PROFILE, "gpu": "H100"}, r"gpu: Extra inputs are not permitted"),
    ({**PROFILE, "down_bytes_per_s": math.inf}, r"down_bytes_per_s is inf: a measurement must be finite"),
    ({**PROFILE, "device_name": "x" * 300}, r"device_name is 300 characters"),
])
def test_a_malformed_profile_is_refused_with_its_reason(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_profile({"profile": bad})


def planning(enabled=True, **planner) -> Planning:
    training = LearningSettings(planner={"enabled": enabled, **planner},
                                train={"batch_size": 2, "max_len": 16, "steps": 2})
    return Planning(training, tiny_model("llama"))


def test_without_the_planner_profiles_are_ignored_and_starts_unchanged():
    p = planning(enabled=False)
    p.take("a", {"profile": "garbage"})  # not even read
    assert p.profiles == {} and p.make(["a"]) is None and p.start_meta("a") == {}


def test_the_plan_is_made_once_for_the_agents_with_a_profile():
    p = planning(ranks=(2, 4), pins={"a": {"front": 1, "back": 1, "rank": 2}, "gone": {"rank": 4}})
    p.take("a", {"profile": PROFILE})
    p.take("b", {"profile": {**PROFILE, "block_s": 0.0005}})
    with pytest.raises(ProtocolError):
        p.take("c", {"profile": {**PROFILE, "rtt_s": -1}})
    # c sent a bad profile: it is not planned; the pin for a node that is not there is dropped
    status = p.make(["a", "b", "c"])
    nodes = status["nodes"]
    assert set(nodes) == {"a", "b"} and Status(run="r", planner=status).planner == status
    assert nodes["a"] | {"a": 1, "b": 5, "rank": 2, "pinned": True, "measured_step_s": None} == nodes["a"]
    assert p.make(["a", "b"]) is None  # once
    assert NodePlan.model_validate(p.start_meta("b")["plan"]) == p.plan.nodes["b"]
    assert p.start_meta("c") == {"plan": None}  # it trains at its pin, else the run's split
    record(status, "b", 3.0, 2)
    record(status, "c", 3.0, 2)  # not planned: nothing to compare with
    assert nodes["b"]["measured_step_s"] == 1.5 and "c" not in nodes


def text(renderable) -> str:
    console = Console(width=120, record=True)
    console.print(renderable)
    return console.export_text()


def test_the_status_shows_the_plan_with_predicted_and_measured_step_times():
    plan = {"mode": "u-shape", "makespan_s": 3.25, "server_busy_s": 1.0, "bottleneck": "clinic",
            "nodes": {"clinic": {"a": 1, "b": 5, "rank": 4, "codec": "lossless", "step_s": 0.5,
                                 "measured_step_s": 0.625,
                                 "planned_link": {"up_bytes_per_s": 2e6, "down_bytes_per_s": 5e6,
                                                  "rtt_s": 0.05, "measured_at": 1.0}},
                      "hospital": {"a": 3, "b": 4, "rank": 16, "codec": "lossless", "step_s": 0.25,
                                   "measured_step_s": None},
                      "odd": "not a node"}}  # the status is another process's: shown as far as it goes
    s = Status(run="r", planner=plan)
    shown = text(planner_table(s))
    assert "makespan 3.250 s, bottleneck clinic" in shown
    rows = {line.split()[0]: line.split() for line in shown.splitlines()
            if line.strip().startswith(("clinic", "hospital"))}
    assert rows["clinic"] == ["clinic", "1/5", "4", "lossless", "0.500", "0.625", "2.0/5.0,", "50",
                              "ms", "-"]
    assert rows["hospital"] == ["hospital", "3/4", "16", "lossless", "0.250", "-", "-", "-"]
    assert "planner" in text(render(s, now=0.0))
    assert planner_table(Status(run="r")) is None and "planner" not in text(render(Status(run="r"), now=0.0))


def test_a_re_measured_link_is_kept_beside_the_plan_only_when_well_formed():
    from fsl_edge.coordinator.planning import record_link

    shown = {"nodes": {"clinic": {"a": 1}}}
    good = {"up_bytes_per_s": 1e6, "down_bytes_per_s": 2e6, "rtt_s": 0.01, "measured_at": 5.0}
    for bad in (None, "fast", {**good, "rtt_s": "x"}, {**good, "up_bytes_per_s": -1.0},
                {k: v for k, v in good.items() if k != "rtt_s"}, {**good, "measured_at": True}):
        record_link(shown, "clinic", bad)
        assert "link" not in shown["nodes"]["clinic"]
    record_link(shown, "nobody", good)
    record_link(None, "clinic", good)
    record_link(shown, "clinic", good)
    assert shown["nodes"]["clinic"]["link"] == good
