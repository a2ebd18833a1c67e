"""What each broker user may read and write, as (access, topic filter) ACL entries.

The topic layout is protocol.py's alone: each entry is built with its topic function for
stand-in ids, then every stand-in level is widened to '+'. The stand-ins hold an uppercase
letter and a '.', so they are valid protocol ids that no node name (a lowercase DNS label) can
ever be: widening never touches a node's own name.

Mosquitto 2's ACL file checks a shared subscription (`$share/GROUP/FILTER`) only when it
delivers a message, against the message's topic (its acl_file check lets every SUBSCRIBE
through): so the workers' entry for their shared subscription is the plain step topic, and an
ACL line spelt `$share/...` would match nothing (tests/integration/test_worker_acl.py shows both).
"""

from __future__ import annotations

RUN, AGENT, WORKER = "Run.any", "Agent.any", "Worker.any"  # stand-ins, widened to '+'
_STAND_INS = (RUN, AGENT, WORKER)


def node_topics(name: str) -> list[tuple[str, str]]:
    """(access, topic) a site needs in every run: its own up, step, down, status and probe
    topics, and the broadcast."""
    from fsl_edge import protocol  # it imports torch: not for `fsl-edge nodes` or --help

    return widened([
        ("write", protocol.topic_up(RUN, name)),
        # split-server workers (training.split.server per-site): a round's first step to
        # whichever worker the broker picks, the later ones to the worker that took it
        ("write", protocol.topic_step(RUN, name)),
        ("write", protocol.topic_step_to(RUN, name, WORKER)),
        ("read", protocol.topic_down(RUN, name)),
        ("read", protocol.topic_broadcast(RUN)),
        ("write", protocol.topic_status(RUN, name)),  # its retained online/offline, its last will
        ("readwrite", protocol.topic_probe(RUN, name)),  # its link probe at join (fsl_edge.profile)
    ])


def worker_topics() -> list[tuple[str, str]]:
    """(access, topic) the split-server workers need, all replicas under one login: every
    site's steps (their shared subscription, and the steps addressed to a worker by id), every
    site's down topic for the replies, the trunk the coordinator sends, their own hello and
    trunk copies up to the coordinator, and the broadcast."""
    from fsl_edge import protocol

    return widened([
        ("read", protocol.topic_step(RUN, AGENT)),  # what topic_shared_steps delivers
        ("read", protocol.topic_step_to(RUN, AGENT, WORKER)),
        ("write", protocol.topic_down(RUN, AGENT)),
        ("read", protocol.topic_trunk(RUN)),
        ("write", protocol.topic_worker_up(RUN, WORKER)),
        ("read", protocol.topic_broadcast(RUN)),
    ])


def widened(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each topic with its stand-in levels replaced by '+'."""
    out = []
    for access, topic in entries:
        levels = topic.split("/")
        assert RUN in levels, f"the run id is no longer a level of {topic}"
        out.append((access, "/".join("+" if level in _STAND_INS else level for level in levels)))
    return out
