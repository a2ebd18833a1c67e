"""Chunking: sizes, duplicates, reordering, corruption, per-sender budgets and deadlines."""

import os
import random
import struct
import tracemalloc
import zlib

import pytest

from fsl_edge.chunking import (
    HEADER_SIZE,
    MQTT_RESERVE,
    Reassembler,
    is_chunk,
    split_message,
)
from fsl_edge.errors import ProtocolError

KiB = 1 << 10


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed_all(r: Reassembler, packets, sender="a"):
    return [m for p in packets if (m := r.feed(sender, p)) is not None]


def test_small_message_travels_unchanged():
    msg = b"FSLE small envelope"
    assert split_message(msg) == [msg]
    assert Reassembler().feed("a", msg) is msg


def test_chunks_fit_the_packet_limit_with_room_for_mqtt():
    msg = os.urandom(5 * KiB * KiB + 123)
    packets = split_message(msg, max_packet=1 << 20)
    assert len(packets) == 6
    assert all(is_chunk(p) and len(p) + MQTT_RESERVE <= 1 << 20 for p in packets)
    assert sum(len(p) - HEADER_SIZE for p in packets) == len(msg)


@pytest.mark.parametrize("size, n_packets", [(0, 1), (168, 1), (169, 2), (200, 2), (201, 3), (10_000, 100)])
def test_round_trip_at_chunk_boundaries(size, n_packets):
    # 100 bytes of data per chunk; a message of up to 168 (= 100 + header) bytes fits unchunked.
    msg = os.urandom(size)
    packets = split_message(msg, max_packet=MQTT_RESERVE + HEADER_SIZE + 100)
    assert len(packets) == n_packets
    assert feed_all(Reassembler(), packets) == [msg]


def test_message_that_looks_like_a_chunk_is_always_chunked():
    msg = b"FSLC but not a chunk"
    packets = split_message(msg)
    assert packets != [msg] and feed_all(Reassembler(), packets) == [msg]


def test_duplicates_and_reordering_reassemble_once():
    msg = os.urandom(50 * KiB)
    packets = split_message(msg, max_packet=4 * KiB)
    shuffled = packets + packets[::3] + packets[::2]
    random.Random(7).shuffle(shuffled)
    r = Reassembler()
    assert feed_all(r, shuffled) == [msg]
    assert r.stats["completed"] == 1
    assert r.stats["duplicate"] == len(shuffled) - len(packets)
    assert r.pending() == 0 and r.buffered_bytes() == 0


def test_late_duplicates_after_completion_do_not_start_a_new_message():
    packets = split_message(os.urandom(20 * KiB), max_packet=4 * KiB)
    r = Reassembler()
    feed_all(r, packets)
    assert feed_all(r, packets) == []
    assert r.pending() == 0


def test_senders_and_interleaved_messages_are_kept_apart():
    a1, a2, b1 = (os.urandom(30 * KiB) for _ in range(3))
    pa1, pa2, pb1 = (split_message(m, max_packet=4 * KiB) for m in (a1, a2, b1))
    r = Reassembler()
    out = []
    for trio in zip(pa1, pa2, pb1):
        for sender, p in zip("aab", trio):
            if (m := r.feed(sender, p)) is not None:
                out.append((sender, m))
    assert sorted(out) == sorted([("a", a1), ("a", a2), ("b", b1)])


def test_corrupt_chunk_is_refused_and_the_message_can_still_complete():
    msg = os.urandom(20 * KiB)
    packets = split_message(msg, max_packet=4 * KiB)
    bad = bytearray(packets[1])
    bad[-1] ^= 1
    r = Reassembler()
    r.feed("a", packets[0])
    with pytest.raises(ProtocolError, match="crc mismatch"):
        r.feed("a", bytes(bad))
    assert r.stats["corrupt"] == 1
    assert feed_all(r, packets[1:]) == [msg]  # the redelivered good copy completes it


def forge(packet: bytes, **fields) -> bytes:
    """Rewrite header fields and recompute the crc, as a buggy or hostile sender might."""
    names = ["magic", "version", "msg_id", "index", "count", "total", "offset", "whole", "crc"]
    values = dict(zip(names, struct.unpack("<4sB3x16sIIQQ16sI", packet[:HEADER_SIZE])))
    values.update(fields)
    head = struct.pack("<4sB3x16sIIQQ16sI", *(values[n] for n in names))
    data = packet[HEADER_SIZE:]
    crc = zlib.crc32(data, zlib.crc32(head[:-4]))
    return head[:-4] + struct.pack("<I", crc) + data


def test_whole_message_digest_catches_a_consistent_forgery():
    packets = split_message(os.urandom(10 * KiB), max_packet=4 * KiB)
    forged = [forge(p, whole=b"\0" * 16) for p in packets]
    with pytest.raises(ProtocolError, match="whole-message digest mismatch"):
        feed_all(Reassembler(), forged)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"index": 9}, "inconsistent header: index 9 of"),
        ({"offset": 10**9}, "inconsistent header"),
        ({"version": 7}, "unknown chunk version 7"),
        ({"total": 5}, "inconsistent header"),
    ],
)
def test_inconsistent_headers_are_refused(fields, message):
    packets = split_message(os.urandom(10 * KiB), max_packet=4 * KiB)
    with pytest.raises(ProtocolError, match=message):
        Reassembler().feed("a", forge(packets[0], **fields))


def test_chunk_disagreeing_with_its_message_drops_it():
    packets = split_message(os.urandom(10 * KiB), max_packet=4 * KiB)
    r = Reassembler()
    r.feed("a", packets[0])
    with pytest.raises(ProtocolError, match="disagrees with earlier chunks"):
        r.feed("a", forge(packets[1], count=99))
    assert r.pending() == 0


def test_gap_in_offsets_is_refused():
    packets = split_message(os.urandom(10 * KiB), max_packet=4 * KiB)
    forged = [forge(packets[0], offset=1)] + packets[1:]
    with pytest.raises(ProtocolError, match="gap or overlap"):
        feed_all(Reassembler(), forged)


def test_truncated_chunk_is_refused():
    packets = split_message(os.urandom(10 * KiB), max_packet=4 * KiB)
    with pytest.raises(ProtocolError, match="a chunk header needs"):
        Reassembler().feed("a", packets[0][:20])


def test_per_sender_budget_refuses_what_would_not_fit():
    r = Reassembler(max_buffered_per_sender=100 * KiB)
    big = split_message(os.urandom(60 * KiB), max_packet=8 * KiB)
    other = split_message(os.urandom(60 * KiB), max_packet=8 * KiB)
    r.feed("a", big[0])
    with pytest.raises(ProtocolError, match="sender 'a' would buffer .* the limit is 102400"):
        r.feed("a", other[0])
    assert r.stats["overflow"] == 1
    assert r.feed("a", other[1]) is None and r.stats["duplicate"] == 1  # its later chunks are ignored
    assert r.feed("b", other[0]) is None  # another sender has its own budget
    assert feed_all(r, big[1:]) == [b"".join(p[HEADER_SIZE:] for p in big)]


def test_message_over_the_size_limit_is_refused_on_its_first_chunk():
    packets = split_message(os.urandom(40 * KiB), max_packet=8 * KiB)
    with pytest.raises(ProtocolError, match="exceeds the limit 32768"):
        Reassembler(max_message_bytes=32 * KiB).feed("a", packets[0])


def test_incomplete_message_is_dropped_after_its_deadline():
    clock = FakeClock()
    r = Reassembler(deadline_s=30, clock=clock)
    packets = split_message(os.urandom(20 * KiB), max_packet=4 * KiB)
    feed_all(r, packets[:-1])
    assert r.pending() == 1 and r.buffered_bytes("a") > 20 * KiB
    clock.now += 29
    assert r.expire() == 0
    clock.now += 2
    assert r.expire() == 1 and r.pending() == 0 and r.buffered_bytes() == 0
    assert r.feed("a", packets[-1]) is None and r.pending() == 0  # too late: not restarted


def test_streams_that_never_complete_do_not_grow_memory():
    clock = FakeClock()
    r = Reassembler(deadline_s=10, clock=clock, remember=256)
    payload = os.urandom(64 * KiB)

    def abandon_many(n):
        for _ in range(n):
            packets = split_message(payload, max_packet=8 * KiB)
            r.feed("a", packets[0])  # the rest never comes
            clock.now += 1

    abandon_many(300)  # warm up: fill the bounded id memory
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    abandon_many(2000)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert r.pending() <= 11 and r.buffered_bytes() <= 11 * (64 * KiB + 2 * KiB)
    assert r.stats["expired"] >= 2280
    assert grown < 1 << 20, f"memory grew by {grown} bytes over 2000 abandoned messages"


def test_invalid_packet_limit_is_a_value_error():
    with pytest.raises(ValueError, match="leaves no room for data"):
        split_message(os.urandom(10_000), max_packet=MQTT_RESERVE + HEADER_SIZE)
