"""Render a status snapshot as Prometheus text exposition format 0.0.4.

Rendered from the same `Status` document `/status` serves, so the two endpoints never disagree.
Unknown values (no loss yet, no traffic yet) are left out rather than written as 0 or NaN:
an absent sample is how Prometheus says "unknown", and a fake 0 would draw a false line on a graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fsl_edge.status import Status, direction

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "fsl_edge_"

# Always exported, even at 0, so a dashboard's "offline agents" panel shows 0 instead of no data.
AGENT_STATES = ("online", "training", "offline", "dropped")
UP_STATES = frozenset({"online", "training"})

Labels = dict[str, str]


@dataclass
class Family:
    """One metric family: a name, a type, a help line and its samples."""

    name: str
    type: str
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        if value is not None:
            self.samples.append((labels, value))


def escape_label(value: str) -> str:
    """Escape a label value as the format requires: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    # HELP lines escape backslash and newline, but not quotes.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):  # counts stay integers: "1048576", not "1048576.0"
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _format_sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {_format_value(value)}"
    pairs = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
    return f"{name}{{{pairs}}} {_format_value(value)}"


def render(families: list[Family]) -> str:
    """Write families as exposition text: HELP and TYPE once per family, then its samples."""
    lines: list[str] = []
    for fam in families:
        name = PREFIX + fam.name
        lines.append(f"# HELP {name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {name} {fam.type}")
        lines.extend(_format_sample(name, labels, value) for labels, value in fam.samples)
    return "\n".join(lines) + "\n"  # the format requires a final line feed


def _run_families(s: Status) -> list[Family]:
    info = Family("info", "gauge", "Run identity and state as labels; always 1.")
    info.add(1, run=s.run, state=s.state, model=s.model, mode=s.mode)
    families = [info]
    for name, value, text in [
        ("round", s.round, "Current federated round (0 before the first)."),
        ("rounds", s.rounds, "Rounds the run is configured for."),
        ("step", s.step, "Current local step within the round."),
        ("steps", s.steps, "Local steps per round."),
        ("compression_ratio", s.compression_ratio, "Raw tensor bytes / payload bytes, all traffic."),
    ]:
        fam = Family(name, "gauge", text)
        fam.add(value)
        families.append(fam)
    return families


def _agent_families(s: Status) -> list[Family]:
    counts = Family("agents", "gauge", "Agents by state.")
    states = dict.fromkeys(AGENT_STATES, 0)
    for agent in s.agents.values():
        states[agent.state] = states.get(agent.state, 0) + 1
    for state, n in states.items():
        counts.add(n, state=state)

    up = Family("agent_up", "gauge", "1 if the agent is connected (online or training), else 0.")
    seen = Family("agent_last_seen_timestamp_seconds", "gauge", "Unix time of the agent's last message.")
    loss = Family("agent_loss", "gauge", "Mean training loss of the agent's last or running round.")
    tokens = Family("agent_tokens_total", "counter", "Tokens the agent trained on, whole run.")
    speed = Family("agent_tokens_per_second", "gauge", "The agent's recent training throughput.")
    sent = Family("agent_payload_bytes_total", "counter",
                  "Payload bytes between the agent and the coordinator, by direction.")
    for agent_id, a in s.agents.items():
        up.add(int(a.state in UP_STATES), agent=agent_id)
        seen.add(a.last_seen, agent=agent_id)
        loss.add(a.loss, agent=agent_id)
        tokens.add(a.tokens, agent=agent_id)
        speed.add(a.tokens_per_s, agent=agent_id)
        for way in ("up", "down"):
            total = sum(t.bytes for kind, t in a.traffic.items() if direction(kind) == way)
            sent.add(total, agent=agent_id, direction=way)
    return [counts, up, seen, loss, tokens, speed, sent]


def _traffic_families(s: Status) -> list[Family]:
    messages = Family("messages_total", "counter", "Messages published, by kind, all agents.")
    payload = Family("payload_bytes_total", "counter", "Payload bytes as published (after the codec), by kind.")
    raw = Family("raw_bytes_total", "counter", "The same tensors' bytes uncompressed, by kind.")
    for kind, t in s.traffic.items():
        messages.add(t.messages, kind=kind)
        payload.add(t.bytes, kind=kind)
        raw.add(t.raw_bytes, kind=kind)
    rejected = Family("rejected_messages_total", "counter", "Messages dropped, by reason.")
    for reason, n in s.rejected.items():
        rejected.add(n, reason=reason)
    return [messages, payload, raw, rejected]


def _history_families(s: Status) -> list[Family]:
    seconds = Family("round_seconds", "gauge", "Wall time of the last finished round.")
    train = Family("train_loss", "gauge", "Mean training loss of the last round that reported one.")
    heldout = Family("heldout_loss", "gauge", "Held-out loss of the last round that measured one.")
    wire = Family("round_payload_bytes", "gauge", "Payload bytes of the last finished round, all kinds.")
    raw = Family("round_raw_bytes", "gauge", "The same round's tensors uncompressed.")
    if s.history:
        seconds.add(s.history[-1].seconds)
        wire.add(s.history[-1].wire_bytes)
        raw.add(s.history[-1].raw_bytes)
    # Held-out loss may be measured only every few rounds: report the last known value.
    train.add(next((r.train_loss for r in reversed(s.history) if r.train_loss is not None), None))
    heldout.add(next((r.heldout_loss for r in reversed(s.history) if r.heldout_loss is not None), None))
    return [seconds, train, heldout, wire, raw]


def render_status(s: Status) -> str:
    """The exposition text for one status snapshot."""
    return render(_run_families(s) + _agent_families(s) + _traffic_families(s) + _history_families(s))
