"""A slow link on one machine: a network namespace behind a veth pair shaped to a rate and an RTT.

Processes run inside the namespace with `link.wrap(argv)` and reach servers on the host through
the shaped veth. netem shapes rate and delay in the kernel where it exists; where it does not
(many cloud kernels ship without sch_netem), tbf shapes the rate on both veth ends and a
delay-line relay (fsl_edge.delay_relay) adds half the RTT in each direction. `partition()`
cuts the link both ways and `heal()` restores it, open connections intact. Needs root.

    with shaped_link(rate_mbit=20, rtt_ms=50) as link, mosquitto_broker(tmp, host=link.bind_host) as b:
        subprocess.run(link.wrap([sys.executable, "-m", "agent", "--broker", link.broker_url(b.port)]))
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# A router's worth of buffer: TCP fills the queue before it sees a drop, so this much queueing
# delay can add to the RTT of a message stuck behind a bulk transfer.
QUEUE_MS = 50
MTU = 1500
RELAY = Path(__file__).with_name("delay_relay.py")


class ShapingUnavailable(RuntimeError):
    """A namespace, veth pair or qdisc cannot be set up here; the message names the failed step."""


@dataclass
class ShapedLink:
    """A live shaped namespace; valid only inside its `shaped_link()` block."""

    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    rate_mbit: float
    rtt_ms: float
    method: str = ""
    """How the link is shaped: "netem", or "tbf+relay" where netem is missing (netem_error says why)."""
    netem_error: str = ""
    _relays: dict[int, tuple[subprocess.Popen, int]] = field(default_factory=dict)
    # What this link created, so teardown never deletes a namespace or link that a name clash
    # made someone else's.
    _made: set[str] = field(default_factory=set)

    @property
    def bind_host(self) -> str:
        """Where host-side servers must listen to be reachable from the namespace.

        Behind the relay they stay on loopback (the relay forwards to them); with netem the
        namespace talks to them directly on the host's veth address.
        """
        return "127.0.0.1" if self.method == "tbf+relay" else self.host_ip

    def endpoint(self, port: int) -> tuple[str, int]:
        """(host, port) a process in the namespace connects to for a host server on bind_host:port."""
        if self.method != "tbf+relay":
            return self.host_ip, port
        if port not in self._relays:
            self._relays[port] = self._start_relay(port)
        return self.host_ip, self._relays[port][1]

    def broker_url(self, port: int) -> str:
        """The mqtt:// URL processes in the namespace use for a broker on bind_host:port."""
        host, relay_port = self.endpoint(port)
        return f"mqtt://{host}:{relay_port}"

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def partition(self) -> None:
        """Cut the link both ways until heal(): what either side sends the other goes nowhere.

        Open connections are not told: TCP keeps their state and retransmits with backoff, so
        a heal before either end gives up resumes them, at each one's next retransmission (up
        to about as long again as the cut lasted). New connections fail at once (no route to
        host) instead of timing out. Routes, not qdiscs: tc's drop rules (matchall, gact) are
        often missing where netem is.
        """
        self._made.add("cut")
        _ip("cut the way to the namespace", "route", "add", "unreachable", f"{self.ns_ip}/32")
        _ip("cut the way to the host", "-n", self.ns, "route", "add", "unreachable", f"{self.host_ip}/32")

    def heal(self) -> None:
        """Undo partition(); a no-op when the link is not cut."""
        if "cut" not in self._made:
            return
        _ip("heal the way to the host", "-n", self.ns, "route", "del", "unreachable", f"{self.host_ip}/32")
        _ip("heal the way to the namespace", "route", "del", "unreachable", f"{self.ns_ip}/32")
        self._made.discard("cut")

    def describe(self) -> str:
        why = f" (no netem: {self.netem_error})" if self.netem_error else ""
        return f"{self.rate_mbit:g} Mbit/s, {self.rtt_ms:g} ms RTT via {self.method}{why}"

    def _start_relay(self, port: int) -> tuple[subprocess.Popen, int]:
        # The same port number on the veth address when free, so URLs read naturally; else any.
        for listen_port in (port, 0):
            # stderr to a file, not a pipe: nobody reads it while the relay runs, and a full
            # pipe would stall the relay.
            with tempfile.TemporaryFile("w+") as err:
                # Run by path, isolated (-I): the relay is stdlib-only, so it works whether or not
                # fsl_edge is installed for this interpreter.
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(RELAY), self.host_ip, str(listen_port),
                     "127.0.0.1", str(port), str(self.rtt_ms / 2)],
                    stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
                line = _first_line(proc, timeout=10.0)
                if line.startswith("listening "):
                    return proc, int(line.rsplit(":", 1)[1])
                _stop(proc)
                err.seek(0)
                why = err.read().strip()[-500:]
        raise ShapingUnavailable(f"the delay relay did not start on {self.host_ip}: {why}")


@contextlib.contextmanager
def shaped_link(rate_mbit: float = 20, rtt_ms: float = 50, name: str = "fsl", *,
                prefer_netem: bool = True) -> Iterator[ShapedLink]:
    """A namespace whose traffic to the host runs at rate_mbit each way with rtt_ms round trips.

    Raises ShapingUnavailable (nothing left behind) where it cannot be built. On exit every
    process still in the namespace is ended and the namespace and veth pair are deleted.
    """
    if rate_mbit <= 0 or rtt_ms < 0:
        raise ValueError(f"need rate_mbit > 0 and rtt_ms >= 0, got {rate_mbit} and {rtt_ms}")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ShapingUnavailable(f"`{tool}` is not installed (apt-get install -y iproute2)")
    if os.geteuid() != 0:
        raise ShapingUnavailable(f"network namespaces need root; running as uid {os.geteuid()}")
    suffix = secrets.token_hex(3)
    host_ip, ns_ip = _free_subnet()
    link = ShapedLink(ns=f"{name}-{suffix}", host_if=f"{name[:5]}{suffix}h", ns_if=f"{name[:5]}{suffix}n",
                      host_ip=host_ip, ns_ip=ns_ip, rate_mbit=rate_mbit, rtt_ms=rtt_ms)
    try:
        _build(link, prefer_netem)
        yield link
    except BaseException as e:
        if left := _teardown(link):
            e.add_note(left)
        raise
    if left := _teardown(link):
        raise RuntimeError(left)


def _build(link: ShapedLink, prefer_netem: bool) -> None:
    ns, h, n = link.ns, link.host_if, link.ns_if
    _ip("create the namespace", "netns", "add", ns)
    link._made.add("ns")
    _ip("create the veth pair", "link", "add", h, "type", "veth", "peer", "name", n, "netns", ns)
    link._made.add("veth")
    _ip("address the host end", "addr", "add", f"{link.host_ip}/30", "dev", h)
    _ip("bring the host end up", "link", "set", h, "up")
    _ip("address the namespace end", "-n", ns, "addr", "add", f"{link.ns_ip}/30", "dev", n)
    _ip("bring the namespace end up", "-n", ns, "link", "set", n, "up")
    _ip("bring loopback up in the namespace", "-n", ns, "link", "set", "lo", "up")

    rate = f"{round(link.rate_mbit * 1000)}kbit"
    one_way = f"{link.rtt_ms / 2:g}ms"
    if prefer_netem:
        packets = max(100, round(link.rate_mbit * 1e6 / 8 * (link.rtt_ms / 2 + QUEUE_MS) / 1000 / MTU))
        netem = ["root", "netem", "delay", one_way, "rate", rate, "limit", str(packets)]
        try:
            _tc("shape the host end with netem", "qdisc", "add", "dev", h, *netem)
            _tc("shape the namespace end with netem", "-n", ns, "qdisc", "add", "dev", n, *netem)
            link.method = "netem"
            return
        except ShapingUnavailable as e:
            link.netem_error = str(e).rsplit(": ", 1)[-1]
            for where in ([], ["-n", ns]):  # drop a half-applied netem before tbf goes on
                subprocess.run(["tc", *where, "qdisc", "del", "dev", h if not where else n, "root"],
                               capture_output=True)
    else:
        link.netem_error = "not tried (prefer_netem=False)"
    # burst: ~4 ms of data at the rate, at least two full frames (tbf needs >= one MTU).
    burst = str(max(2 * MTU, round(link.rate_mbit * 1e6 / 8 / 250)))
    tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", f"{QUEUE_MS}ms"]
    _tc("shape the host end with tbf", "qdisc", "add", "dev", h, *tbf)
    _tc("shape the namespace end with tbf", "-n", ns, "qdisc", "add", "dev", n, *tbf)
    link.method = "tbf+relay"


def _teardown(link: ShapedLink) -> str:
    """Undo everything; return what could not be removed ('' when all is gone)."""
    for proc, _ in link._relays.values():
        _stop(proc)
    link._relays.clear()
    if "ns" not in link._made:
        return ""
    pids = subprocess.run(["ip", "netns", "pids", link.ns], capture_output=True, text=True).stdout.split()
    # A process left inside keeps the namespace (and its veth) alive after `netns del`.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        deadline = time.monotonic() + 2.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            time.sleep(0.02)
    subprocess.run(["ip", "netns", "del", link.ns], capture_output=True)
    if "veth" in link._made:  # normally gone with its peer in the namespace
        subprocess.run(["ip", "link", "del", link.host_if], capture_output=True)
    if "cut" in link._made:  # a partition's host route names no device: it outlives the veth
        subprocess.run(["ip", "route", "del", "unreachable", f"{link.ns_ip}/32"], capture_output=True)
    left = []
    if link.ns in _names(["ip", "netns", "list"]):
        left.append(f"namespace {link.ns}")
    if link.host_if in _names(["ip", "-o", "link", "show"]):
        left.append(f"link {link.host_if}")
    if "cut" in link._made and link.ns_ip in _names(["ip", "route", "show", f"{link.ns_ip}/32"]):
        left.append(f"route {link.ns_ip}")
    return f"shaped_link could not remove {', '.join(left)}; delete by hand" if left else ""


def _running(pid: str) -> bool:
    # A zombie (ended, not yet reaped by its parent) already let go of the namespace.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _names(argv: list[str]) -> set[str]:
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    return {word.rstrip(":").split("@")[0] for word in out.split()}


def _ip(what: str, *args: str) -> None:
    _run(what, ["ip", *args])


def _tc(what: str, *args: str) -> None:
    _run(what, ["tc", *args])


def _run(what: str, argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise ShapingUnavailable(f"cannot {what} (`{' '.join(argv)}`): {done.stderr.strip() or done.returncode}")


def _free_subnet() -> tuple[str, str]:
    """Host and namespace addresses of a random 10.x/30 that no route or address here overlaps."""
    taken = []
    for argv in (["ip", "-j", "-4", "route", "show", "table", "all"], ["ip", "-j", "-4", "addr"]):
        out = subprocess.run(argv, capture_output=True, text=True).stdout or "[]"
        for entry in json.loads(out):
            prefixes = [entry.get("dst")] + [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])]
            for p in prefixes:
                with contextlib.suppress(ValueError, TypeError):
                    taken.append(ipaddress.ip_network(p, strict=False))
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(200, 254)}.{random.randint(0, 255)}."
                                   f"{4 * random.randint(0, 63)}/30")
        if not any(net.overlaps(t) for t in taken):
            host, ns = list(net.hosts())
            return str(host), str(ns)
    raise ShapingUnavailable("no free 10.200-254.x.x/30 subnet for the veth pair")


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's first stdout line, or '' if it exits or stays silent for timeout seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
