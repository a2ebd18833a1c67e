"""Bounded resources: reassembly memory over all senders, each sender's queue of messages not
yet handled, and the coordinator's memory of names it asked to introduce themselves. Each test
feeds more than its bound and checks that what is held stays within it, that the excess is
counted, and that a well-behaved sender is still served."""

import os
import threading
import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from fsl_edge.chunking import Reassembler, split_message
from fsl_edge.config import Bounds, RuntimeSettings
from fsl_edge.coordinator.coordinator import Coordinator
from fsl_edge.errors import LimitError, ProtocolError
from fsl_edge.inbox import ITEM_OVERHEAD, FairInbox
from fsl_edge.transport import MqttLink

KiB, MiB = 1 << 10, 1 << 20


def first_chunk(size: int) -> bytes:
    """The first of many chunks of a message whose other chunks never come."""
    return split_message(os.urandom(size), max_packet=8 * KiB)[0]


# --- reassembly: a global bound, not only one per sender ----------------------------------------

def test_many_senders_each_within_their_limit_cannot_exceed_the_total():
    r = Reassembler(max_buffered_per_sender=1 * MiB, max_buffered_total=4 * MiB)
    refused = 0
    for sender in range(64):  # 64 senders x ~1 MiB each: 16 times the total
        try:
            r.feed(f"mallory-{sender}", first_chunk(1 * MiB - 4 * KiB))
        except LimitError:
            refused += 1
        assert r.buffered_bytes() <= 4 * MiB
    # equal holders never evict each other: the first four fit, the rest are refused
    assert refused == 60 and r.stats["overflow"] == 60 and r.stats["evicted"] == 0
    assert r.pending() == 4


def test_a_sender_holding_little_still_gets_in_when_the_total_is_full():
    r = Reassembler(max_buffered_per_sender=1 * MiB, max_buffered_total=4 * MiB)
    for sender in range(8):
        try:
            r.feed(f"mallory-{sender}", first_chunk(1 * MiB - 4 * KiB))
        except LimitError:
            pass
    honest = os.urandom(100 * KiB)
    got = [m for p in split_message(honest, max_packet=8 * KiB) if (m := r.feed("alice", p))]
    assert got == [honest]  # a flooder's oldest message gave way to it
    assert r.stats["evicted"] == 1 and r.buffered_bytes() <= 4 * MiB
    assert r.buffered_bytes("alice") == 0  # completed, released


def test_a_message_bigger_than_the_total_is_refused_as_a_limit():
    r = Reassembler(max_buffered_per_sender=8 * MiB, max_buffered_total=1 * MiB)
    with pytest.raises(LimitError, match="all senders would buffer"):
        r.feed("a", first_chunk(2 * MiB))
    assert isinstance(LimitError("x"), ProtocolError)  # callers that catch ProtocolError still do


def test_an_evicted_message_is_not_restarted_by_its_later_chunks():
    r = Reassembler(max_buffered_per_sender=2 * MiB, max_buffered_total=2 * MiB)
    big = split_message(os.urandom(1 * MiB + 512 * KiB), max_packet=64 * KiB)
    r.feed("mallory", big[0])
    small = os.urandom(600 * KiB)
    got = [m for p in split_message(small, max_packet=64 * KiB) if (m := r.feed("alice", p))]
    assert got == [small] and r.stats["evicted"] == 1
    assert r.feed("mallory", big[1]) is None and r.pending() == 0  # ignored, as a duplicate


# --- the queue of received messages: per sender, fair, bounded in bytes -------------------------

def test_a_flooding_sender_is_held_to_its_queue_and_the_excess_counted():
    drops = []
    inbox = FairInbox(per_sender=16, max_bytes=64 * MiB, on_drop=drops.append)
    for i in range(1000):
        inbox.put("mallory", ("mallory", i), 100)
    for i in range(3):
        assert inbox.put("alice", ("alice", i), 100)
    assert inbox.queued("mallory") == 16 and len(inbox) == 19
    assert inbox.dropped["queue_full"] == 984 and drops.count("queue_full") == 984
    served = [inbox.get(0) for _ in range(6)]
    # served in turn: alice's three come within the first six, each sender's in its own order
    assert [s for s in served if s[0] == "alice"] == [("alice", 0), ("alice", 1), ("alice", 2)]
    assert [s for s in served if s[0] == "mallory"] == [("mallory", i) for i in range(3)]
    rest = [inbox.get(0) for _ in range(13)]
    assert rest == [("mallory", i) for i in range(3, 16)]
    assert inbox.get(0) is None and inbox.bytes == 0


def test_the_byte_bound_drops_from_the_sender_holding_the_most():
    cost = 100 * KiB + ITEM_OVERHEAD
    inbox = FairInbox(per_sender=1000, max_bytes=10 * cost)
    for i in range(50):
        inbox.put("mallory", i, 100 * KiB)
    assert inbox.bytes <= 10 * cost and inbox.queued("mallory") == 10
    assert inbox.dropped["overload"] == 40  # refused: it already held the most
    assert inbox.put("alice", "a", 100 * KiB)  # makes room by dropping mallory's newest
    assert inbox.bytes <= 10 * cost and inbox.dropped["overload"] == 41
    assert inbox.queued("mallory") == 9 and inbox.queued("alice") == 1
    assert [inbox.get(0) for _ in range(3)] == [0, "a", 1]


def test_a_message_bigger_than_the_queue_is_dropped_not_queued():
    inbox = FairInbox(per_sender=4, max_bytes=1 * MiB)
    assert not inbox.put("a", "huge", 2 * MiB)
    assert len(inbox) == 0 and inbox.dropped["overload"] == 1


def test_get_waits_for_a_message_and_times_out_without_one():
    inbox = FairInbox(per_sender=4, max_bytes=1 * MiB)
    started = time.monotonic()
    assert inbox.get(0.05) is None and time.monotonic() - started >= 0.05
    threading.Timer(0.05, lambda: inbox.put("a", "late", 1)).start()
    assert inbox.get(5) == "late"


# --- settings and wiring --------------------------------------------------------------------------

def test_the_link_takes_its_bounds_from_the_runtime_settings():
    bounds = Bounds(reassembly_bytes=3 * MiB, reassembly_per_sender=2 * MiB, inbox_per_sender=5,
                    inbox_bytes=7 * MiB, chunk_deadline_s=9)
    link = MqttLink("mqtt://127.0.0.1:1", "t", [], bounds=RuntimeSettings(bounds=bounds).bounds)
    r = link._reassembler
    assert (r.max_buffered_total, r.max_buffered_per_sender, r.deadline_s) == (3 * MiB, 2 * MiB, 9)
    assert (link.inbox.per_sender, link.inbox.max_bytes) == (5, 7 * MiB)
    assert RuntimeSettings().bounds == Bounds()  # every process is bounded by default
    with pytest.raises(ValidationError, match="inbox_per_sender"):
        Bounds(inbox_per_sender=0)


def test_the_coordinator_remembers_a_bounded_number_of_names_it_asked_to_introduce():
    sent = []
    me = SimpleNamespace(introduced={}, run_id="r", round=0, incarnation="x",
                         link=SimpleNamespace(publish=lambda topic, env: sent.append(topic)))
    for i in range(5000):  # names are the sender's to invent
        Coordinator.ask_to_introduce(me, f"stranger-{i}")
    assert len(me.introduced) <= 1024 and len(sent) == 1024
    Coordinator.ask_to_introduce(me, "stranger-0")  # asked moments ago: not again
    assert len(sent) == 1024

