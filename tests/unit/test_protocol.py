"""The envelope round-trips, and a decoder refuses every kind of bad input with a specific message."""

import struct
import time
import zlib

import pytest
import torch

from fsl_edge import protocol
from fsl_edge.errors import CodecError, ProtocolError
from fsl_edge.protocol import (
    DuplicateFilter,
    Envelope,
    Flag,
    Limits,
    MessageKind,
    SequenceCounter,
    Topic,
    decode_envelope,
    encode_envelope,
    parse_topic,
)


def envelope(**overrides) -> Envelope:
    env = Envelope(
        kind=MessageKind.ACTIVATION_UP, run_id="run-1", agent_id="hospital_a", round=3, step=17,
        seq=2**40 + 5, flags=Flag.RESEND, meta={"loss": 2.5, "tokens": 4096, "tags": ["x", {"y": None}]},
    )
    env.add_tensor("hidden", torch.randn(2, 8, 16), ("raw", "shuffle", "zstd"))
    env.add_tensor("mask", torch.ones(2, 8, dtype=torch.bool))
    env.add_tensor("ids", torch.arange(16, dtype=torch.int64).reshape(2, 8), ("raw", "zstd:level=1"))
    for key, value in overrides.items():
        setattr(env, key, value)
    return env


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the checksum, as a hostile sender would, so deeper checks are reached."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def test_round_trip_keeps_every_field_and_tensor():
    env = envelope()
    out = decode_envelope(encode_envelope(env))
    assert out == env
    for name, t in env.tensor_dict().items():
        assert torch.equal(out.tensor(name), t)


@pytest.mark.parametrize("kind", list(MessageKind))
def test_round_trip_every_kind_without_tensors(kind):
    env = Envelope(kind, "r", "", seq=0)
    assert decode_envelope(encode_envelope(env)) == env


def test_round_trip_of_a_bytes_subclass_view():
    env = envelope()
    assert decode_envelope(memoryview(bytearray(encode_envelope(env)))) == env


def test_header_layout_is_fixed():
    data = encode_envelope(Envelope(MessageKind.HELLO, "r", "a", round=1, step=2, seq=3))
    assert data[:4] == b"FSLE" and data[4] == protocol.PROTOCOL_VERSION and data[5] == MessageKind.HELLO
    assert struct.unpack_from("<IIQ", data, 8) == (1, 2, 3)


def test_bad_magic():
    with pytest.raises(ProtocolError, match="bad magic b'XXXX'"):
        decode_envelope(b"XXXX" + encode_envelope(envelope())[4:])


def test_unknown_version():
    data = bytearray(encode_envelope(envelope()))
    data[4] = 99
    with pytest.raises(ProtocolError, match="unknown protocol version 99; this build speaks version 1"):
        decode_envelope(bytes(data))


@pytest.mark.parametrize("keep", [0, 10, 35])
def test_too_short_to_hold_a_header(keep):
    with pytest.raises(ProtocolError, match="truncated envelope"):
        decode_envelope(encode_envelope(envelope())[:keep])


def test_truncated_in_transit_fails_the_checksum():
    data = encode_envelope(envelope())
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        decode_envelope(data[:-100])


def test_flipped_bit_fails_the_checksum():
    data = bytearray(encode_envelope(envelope()))
    data[len(data) // 2] ^= 0x10
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        decode_envelope(bytes(data))


def test_oversize_message_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds the limit 64"):
        decode_envelope(encode_envelope(envelope()), Limits(max_message_bytes=64))


def test_lying_payload_length_is_caught_with_a_valid_checksum():
    env = Envelope(MessageKind.GRADIENT_DOWN, "r", "a")
    env.add_tensor("g", torch.ones(4))
    data = bytearray(encode_envelope(env))
    at = data.index(struct.pack("<Q", 16))  # the payload length field of "g"
    data[at : at + 8] = struct.pack("<Q", 2**62)
    with pytest.raises(ProtocolError, match="declares 4611686018427387904 payload bytes, 16 are present"):
        decode_envelope(reseal(data))


def test_lying_shape_over_the_limit_is_refused_before_any_allocation():
    env = Envelope(MessageKind.ACTIVATION_UP, "r", "a")
    env.add_tensor("h", torch.ones(3))
    data = bytearray(encode_envelope(env))
    at = data.index(struct.pack("<Q", 3))  # the only dimension
    data[at : at + 8] = struct.pack("<Q", 2**63)
    with pytest.raises(ProtocolError, match=r"tensor 'h': shape \(9223372036854775808,\) float32 exceeds the limit"):
        decode_envelope(reseal(data))


def test_lying_shape_within_limits_is_caught_by_the_codec():
    env = Envelope(MessageKind.ACTIVATION_UP, "r", "a")
    env.add_tensor("h", torch.ones(3))
    data = bytearray(encode_envelope(env))
    at = data.index(struct.pack("<Q", 3))
    data[at : at + 8] = struct.pack("<Q", 4)
    out = decode_envelope(reseal(data))
    with pytest.raises(CodecError, match="codec stage 'raw': payload has 12 bytes"):
        out.tensor("h")


@pytest.mark.parametrize(
    "limits, message",
    [
        (Limits(max_tensors=2), "3 tensors declared, the limit is 2"),
        (Limits(max_meta_bytes=8), "meta of .* bytes declared, the limit is 8"),
        (Limits(max_ndim=2), "tensor 'hidden': 3 dimensions, the limit is 2"),
        (Limits(max_stages=2), "tensor 'hidden': 3 codec stages, expected 1-2"),
        (Limits(max_tensor_bytes=1000), "tensor 'hidden': shape .* exceeds the limit 1000 bytes"),
    ],
)
def test_configured_limits_are_enforced(limits, message):
    with pytest.raises(ProtocolError, match=message):
        decode_envelope(encode_envelope(envelope()), limits)


def test_unknown_kind_and_flags_are_refused():
    data = bytearray(encode_envelope(envelope()))
    data[5] = 200
    with pytest.raises(ProtocolError, match="unknown message kind 200"):
        decode_envelope(reseal(data))
    data = bytearray(encode_envelope(envelope()))
    data[6] = 0x80
    with pytest.raises(ProtocolError, match="unknown flag bits 0x80"):
        decode_envelope(reseal(data))


def test_unknown_dtype_code_is_refused():
    env = Envelope(MessageKind.ADAPTER_UP, "r", "a")
    env.add_tensor("w", torch.ones(2))
    data = bytearray(encode_envelope(env))
    at = data.index(b"\x01w") + 2  # name length, name, then the dtype code
    data[at] = 77
    with pytest.raises(ProtocolError, match="tensor 'w': unknown dtype code 77"):
        decode_envelope(reseal(data))


def test_meta_is_json_only():
    with pytest.raises(ProtocolError, match="meta must hold only JSON values"):
        encode_envelope(Envelope(MessageKind.LOSS, "r", "a", meta={"t": torch.ones(1)}))
    with pytest.raises(ProtocolError, match="meta must hold only JSON values"):
        encode_envelope(Envelope(MessageKind.LOSS, "r", "a", meta={"loss": float("nan")}))
    with pytest.raises(ProtocolError, match="meta must be a dict"):
        encode_envelope(Envelope(MessageKind.LOSS, "r", "a", meta=[1, 2]))


def test_non_json_meta_on_the_wire_is_refused():
    ok = encode_envelope(Envelope(MessageKind.LOSS, "r", "a", meta={"v": 1.25}))
    for forged, message in ((b'{"v": NaN}', "not valid JSON"), (b"[1,2,3,45]", "must be a JSON object")):
        data = ok.replace(b'{"v":1.25}', forged)
        assert len(data) == len(ok)
        with pytest.raises(ProtocolError, match=message):
            decode_envelope(reseal(data))


def test_fields_that_do_not_fit_are_refused_on_encode():
    with pytest.raises(ProtocolError, match="round -1 does not fit"):
        encode_envelope(Envelope(MessageKind.LOSS, "r", "a", round=-1))
    with pytest.raises(ProtocolError, match="seq 18446744073709551616 does not fit"):
        encode_envelope(Envelope(MessageKind.LOSS, "r", "a", seq=2**64))
    with pytest.raises(ProtocolError, match="agent id 'a/b' is invalid"):
        encode_envelope(Envelope(MessageKind.LOSS, "r", "a/b"))


def test_duplicate_tensor_names_are_refused():
    env = Envelope(MessageKind.ADAPTER_UP, "r", "a")
    env.add_tensor("w", torch.ones(2))
    env.add_tensor("w", torch.ones(2))
    with pytest.raises(ProtocolError, match="duplicate tensor names"):
        decode_envelope(encode_envelope(env))


def test_missing_tensor_names_what_is_there():
    with pytest.raises(ProtocolError, match=r"ACTIVATION_UP message has no tensor 'nope' \(has \['hidden'"):
        envelope().tensor("nope")


# --- topics -------------------------------------------------------------------------------------


def test_topic_layout():
    assert protocol.topic_up("r1", "a1") == "fsl/r1/agent/a1/up"
    assert protocol.topic_down("r1", "a1") == "fsl/r1/agent/a1/down"
    assert protocol.topic_all_up("r1") == "fsl/r1/agent/+/up"
    assert protocol.topic_broadcast("r1") == "fsl/r1/broadcast"
    assert protocol.topic_status("r1", "a1") == "fsl/r1/status/a1"
    assert protocol.topic_all_status("r1") == "fsl/r1/status/+"
    assert protocol.topic_probe("r1", "a1") == "fsl/r1/probe/a1"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "-x", "x" * 65, "é"])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(ProtocolError, match="is invalid"):
        protocol.topic_up("run", bad)


def test_parse_topic_inverts_the_builders():
    assert parse_topic(protocol.topic_up("r", "a")) == Topic("r", "up", "a")
    assert parse_topic(protocol.topic_down("r", "a")) == Topic("r", "down", "a")
    assert parse_topic(protocol.topic_broadcast("r")) == Topic("r", "broadcast", None)
    assert parse_topic(protocol.topic_status("r", "a")) == Topic("r", "status", "a")
    assert parse_topic(protocol.topic_probe("r", "a")) == Topic("r", "probe", "a")
    # split-server workers: a round's first step to any worker, the rest to the one serving
    assert parse_topic(protocol.topic_step("r", "a")) == Topic("r", "step", "a", None)
    assert parse_topic(protocol.topic_step_to("r", "a", "w")) == Topic("r", "step", "a", "w")
    assert parse_topic(protocol.topic_trunk("r")) == Topic("r", "trunk", None)
    assert parse_topic(protocol.topic_worker_up("r", "w")) == Topic("r", "worker", "w")
    assert protocol.topic_shared_steps("r") == "$share/fsl-split/fsl/r/agent/+/step"
    assert protocol.topic_worker_steps("r", "w") == "fsl/r/agent/+/step/w"
    for bad in ["fsl/r/agent/a/sideways", "other/r/broadcast", "fsl/r", "fsl/r/status/a/b",
                "fsl/r/probe/a/b", "fsl/r/probe/+", "fsl/r/agent/a/step/w/x", "fsl/r/agent/a/step/+",
                "fsl/r/worker/w/down", "fsl/r/trunk/x"]:
        with pytest.raises(ProtocolError, match="not part of the fsl-edge protocol"):
            parse_topic(bad)


# --- duplicates ---------------------------------------------------------------------------------


def test_duplicate_filter_recognises_redeliveries_per_sender():
    f = DuplicateFilter(window=8)
    assert [f.is_duplicate("a", s) for s in (1, 2, 3)] == [False] * 3
    assert f.is_duplicate("a", 2) and f.is_duplicate("a", 3)
    assert not f.is_duplicate("b", 2)  # senders are independent


def test_duplicate_filter_accepts_reordering_inside_the_window():
    f = DuplicateFilter(window=8)
    assert [f.is_duplicate("a", s) for s in (10, 7, 9, 3)] == [False] * 4
    assert [f.is_duplicate("a", s) for s in (10, 7, 9, 3)] == [True] * 4
    assert not f.is_duplicate("a", 8)


def test_duplicate_filter_treats_numbers_older_than_the_window_as_seen():
    f = DuplicateFilter(window=8)
    f.is_duplicate("a", 100)
    assert f.is_duplicate("a", 92)  # 8 behind: outside the window, cannot be told apart
    assert not f.is_duplicate("a", 93)
    f.is_duplicate("a", 1000)  # a jump beyond the window resets it
    assert not f.is_duplicate("a", 999) and f.is_duplicate("a", 1000)


def test_duplicate_filter_memory_is_bounded():
    f = DuplicateFilter(window=64, max_senders=10)
    for seq in range(10_000):
        f.is_duplicate(seq % 50, seq)
    assert len(f._senders) == 10
    assert all(bits < 1 << 64 for _, bits in f._senders.values())


def test_sequence_counter_survives_a_restart():
    first = SequenceCounter()
    used = [first.next() for _ in range(100)]
    time.sleep(0.001)  # numbers are clock microseconds: 100 of them are used up within 100 us
    assert SequenceCounter().next() > max(used)
    assert SequenceCounter(start=5).next() == 5


def test_sequence_numbers_catch_up_with_a_clock_set_late(monkeypatch):
    """A sender started before NTP set its clock must not stay below its previous run's numbers."""
    from fsl_edge import protocol as p

    now = [1_000_000_000]  # ns: a clock far behind
    monkeypatch.setattr(p.time, "time_ns", lambda: now[0])
    counter = p.SequenceCounter()
    first = counter.next()
    now[0] = 1_800_000_000_000_000_000  # NTP has set it
    later = counter.next()
    assert later == now[0] // 1000 and later > first
    assert counter.next() == later + 1  # and strictly increasing within a microsecond
    fixed = p.SequenceCounter(start=5)
    assert [fixed.next(), fixed.next()] == [5, 6]  # an explicit start ignores the clock
