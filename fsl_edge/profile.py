"""What a node can do, measured on the node: its device, its speed on the run's model, its link.

`profile_node` is what an agent runs at join (and again every `every_s`): it times forward and
backward passes of one block and of the head of the real model at a reference batch, reads the
memory it may use, and times MQTT messages of two sizes through the real broker. The planner
(fsl_edge.planner) turns these profiles into a cut and a LoRA rank per node.

The link probe publishes at QoS 1 on a topic of the caller's (the node needs read and write
on it). A PUBACK returns once the broker holds the whole message (rtt + size / up); a copy to
a subscriber arrives once it has also come back down (that + size / down). From two sizes the
slopes give the bandwidth each way and the small message's PUBACK gives the RTT.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import statistics
import threading
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import TransportError
from .split import causal_lm_loss, discover, finish, positions, run_blocks

FLOOR_S = 1e-6  # a transfer faster than this reads as this: the probe cannot resolve it


class ProfileSettings(BaseModel):
    """How a node measures itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: int = Field(4, ge=1)
    """Reference batch of the compute measurement (use the run's batch: attention is not linear
    in the sequence length)."""
    seq: int = Field(128, ge=1)
    """Reference sequence length of the compute measurement."""
    repeats: int = Field(3, ge=1)
    """Timed passes (and probe messages per size); the median pass, the fastest message count."""
    probe_small: int = Field(64, ge=1)
    """Bytes of the small probe message: its PUBACK time is the RTT."""
    probe_large: int = Field(256 << 10, ge=1024)
    """Bytes of the large probe message; keep it under the broker's packet limit (EMQX: 1 MB,
    AWS IoT: 128 KB) and long enough to take well over the RTT's jitter on the link."""
    every_s: float = Field(600.0, gt=0)
    """How often a running agent measures its link again."""


class NodeProfile(BaseModel):
    """A node's device, its measured compute on the run's model, and its link to the broker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_kind: str
    """'cuda' or 'cpu'."""
    device_name: str
    memory_bytes: int = Field(ge=0)
    """What training may use: free GPU memory, or available host memory (within a cgroup limit),
    plus what the model's weights already take there (the planner counts those it keeps)."""
    block_s: float = Field(gt=0)
    """Seconds for a forward and backward of one block (frozen base) at ref_batch x ref_seq."""
    head_s: float = Field(ge=0)
    """Seconds for a forward and backward of the final norm, the head and the loss, same batch."""
    ref_batch: int = Field(ge=1)
    ref_seq: int = Field(ge=1)
    up_bytes_per_s: float = Field(gt=0)
    down_bytes_per_s: float = Field(gt=0)
    rtt_s: float = Field(ge=0)
    model: str = ""
    """The model the compute was measured on."""
    measured_at: float = 0.0
    """Unix time of the measurement."""

    @property
    def ref_tokens(self) -> int:
        return self.ref_batch * self.ref_seq


# --- device --------------------------------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def host_available_bytes() -> int:
    """Available host memory, capped by the cgroup (v2) limit a container runs under."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":  # Docker's --memory: the host's free memory is not ours to use
            used = int((cgroup / "memory.current").read_text())
            available = min(available, max(int(limit) - used, 0))
    return available


def device_info(device: torch.device) -> tuple[str, str, int]:
    """(kind, name, usable memory bytes) of `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return "cuda", torch.cuda.get_device_name(device), free
    return "cpu", _cpu_name(), host_available_bytes()


# --- compute -------------------------------------------------------------------------------


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call (allocations, kernel selection)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_compute(model: torch.nn.Module, batch: int, seq: int, repeats: int = 3) -> tuple[float, float]:
    """(block_s, head_s): seconds of a forward + backward of block 0 and of norm + head + loss.

    Only the gradient of the input is taken: the base is frozen under LoRA, so its weight
    gradients are never computed in training either (LoRA's own cost is the delay model's).
    """
    parts = discover(model)
    weight = parts.embed.weight
    device, dtype = weight.device, weight.dtype
    g = torch.Generator(device=device).manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)  # (B, T)
    pos = positions(mask)  # (B, T)
    h = torch.randn(batch, seq, parts.hidden_size, generator=g, device=device,
                    dtype=dtype).requires_grad_(True)  # (B, T, C)
    labels = torch.randint(0, weight.shape[0], (batch, seq), generator=g, device=device)  # (B, T)

    def block() -> None:
        out = run_blocks(parts, h, 0, 1, mask, pos)  # (B, T, C)
        torch.autograd.grad(out, h, torch.ones_like(out))

    def head() -> None:
        loss = causal_lm_loss(finish(parts, h), labels)
        torch.autograd.grad(loss, h)

    with torch.enable_grad():
        return _timed(block, device, repeats), _timed(head, device, repeats)


# --- link ----------------------------------------------------------------------------------


def _client(url: str, client_id: str, login):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if url.startswith("mqtts://"):
        client.tls_set(ca_certs=login.ca_file if login else None)
    if login and login.username:
        client.username_pw_set(login.username, login.password)
    return client


def measure_link(url: str, topic: str, small: int = 64, large: int = 256 << 10, repeats: int = 3,
                 login=None, timeout: float = 30.0) -> tuple[float, float, float]:
    """(up bytes/s, down bytes/s, rtt s) to the broker at `url`, probing on `topic`.

    First nobody subscribes: a message's PUBACK takes rtt + size / up. Then a second connection
    subscribes: its copy arrives after rtt + size / up + size / down. The phases are apart
    because the two connections share the node's downlink, where the broker may queue the
    PUBACK behind the copy. `login`: a transport.BrokerLogin for TLS or passwords. The fastest
    of `repeats` messages per size is kept: other traffic only ever adds time.
    """
    from .transport import parse_broker_url

    host, port = parse_broker_url(url)
    tag = secrets.token_hex(4)
    pub, sub = _client(url, f"fsl-probe-{tag}-p", login), _client(url, f"fsl-probe-{tag}-s", login)
    cond = threading.Condition()
    seen: dict[object, float] = {}  # mid -> PUBACK time, payload key -> arrival time
    subscribed, refused = threading.Event(), []

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        refused.extend(rc for rc in reason_codes if rc.is_failure)
        subscribed.set()

    def on_publish(client, userdata, mid, reason_code, properties):
        with cond:
            seen[mid] = time.perf_counter()
            cond.notify_all()

    def on_message(client, userdata, msg):
        with cond:
            seen[bytes(msg.payload[:8])] = time.perf_counter()
            cond.notify_all()

    pub.on_publish, sub.on_message, sub.on_subscribe = on_publish, on_message, on_subscribe
    count = iter(range(1 << 62))

    def send(size: int, echo: bool) -> float:
        """Seconds until the PUBACK (echo=False) or the copy (echo=True) of a `size`-byte message."""
        key = next(count).to_bytes(8, "little")
        payload = key + os.urandom(max(size - 8, 0))  # random: nothing on the way compresses it
        started = time.perf_counter()
        mid = pub.publish(topic, payload, qos=1).mid
        with cond:
            if not cond.wait_for(lambda: (key if echo else mid) in seen and mid in seen, timeout):
                raise TransportError(f"a {size}-byte probe message at {url} got no "
                                     f"{'copy' if echo else 'PUBACK'} within {timeout:.0f} s")
            return seen[key if echo else mid] - started

    def fastest(echo: bool) -> dict[int, float]:
        send(large, echo)  # opens TCP's congestion window, as steady training traffic has
        times = [(size, send(size, echo)) for _ in range(repeats) for size in (small, large)]
        return {size: min(t for s, t in times if s == size) for size in (small, large)}

    try:
        for c in (pub, sub):
            c.connect(host, port, keepalive=30)
            c.loop_start()
        ack = fastest(echo=False)
        sub.subscribe(topic, qos=1)
        if not subscribed.wait(timeout):
            raise TransportError(f"the link probe could not subscribe at {url} within {timeout:.0f} s")
        if refused:
            raise TransportError(f"the broker at {url} refused the link probe's subscription to "
                                 f"{topic} ({refused[0]}): the node needs read and write on it")
        echo = fastest(echo=True)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    extra = large - small
    up = extra / max(ack[large] - ack[small], FLOOR_S)
    down = extra / max((echo[large] - echo[small]) - (ack[large] - ack[small]), FLOOR_S)
    return up, down, max(ack[small] - small / up, 0.0)


def profile_node(model: torch.nn.Module, url: str, topic: str, settings: ProfileSettings = ProfileSettings(),
                 login=None, model_name: str = "") -> NodeProfile:
    """Measure this node: device and memory, compute on `model`, and the link to the broker."""
    device = next(model.parameters()).device
    kind, name, memory = device_info(device)
    # the loaded model already takes some of it, and the planner counts the weights a node
    # keeps in its own estimate: give them back so they are not counted twice
    memory += sum(p.numel() * p.element_size() for p in model.parameters() if p.device == device)
    block_s, head_s = measure_compute(model, settings.batch, settings.seq, settings.repeats)
    up, down, rtt = measure_link(url, topic, settings.probe_small, settings.probe_large,
                                 settings.repeats, login)
    return NodeProfile(device_kind=kind, device_name=name, memory_bytes=memory, block_s=block_s,
                       head_s=head_s, ref_batch=settings.batch, ref_seq=settings.seq,
                       up_bytes_per_s=up, down_bytes_per_s=down, rtt_s=rtt, model=model_name,
                       measured_at=time.time())
