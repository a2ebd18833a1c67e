"""shaped_link() really shapes: a bulk transfer from the namespace takes the time the rate
allows, a round trip takes the RTT, and nothing is left behind. Skipped, with the reason,
where namespaces cannot be created (not root, no iproute2)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from fsl_edge import netshape
from fsl_edge.netshape import ShapedLink, ShapingUnavailable, shaped_link

pytestmark = pytest.mark.integration

RATE_MBIT, RTT_MS = 20.0, 50.0
SIZE = 2_500_000  # 1 s at 20 Mbit/s: long enough that the handshake and one RTT are noise

# Runs inside the namespace: "up" sends n bytes and waits for the server's count, "ping" does
# n one-byte round trips. Prints the bytes confirmed and each timing.
CLIENT = """
import json, socket, sys, time
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times, got = [], 0
if mode == "up":
    t = time.monotonic(); s.sendall(b"u" * n); s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64)); times.append(time.monotonic() - t)
else:
    for _ in range(n):
        t = time.monotonic(); s.sendall(b"p"); got += len(s.recv(1)); times.append(time.monotonic() - t)
print(json.dumps({"bytes": got, "seconds": times}))
"""


def sink(conn: socket.socket) -> None:
    count = 0
    while data := conn.recv(65536):
        count += len(data)
    conn.sendall(str(count).encode())


def echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(64):
        conn.sendall(data)


@contextlib.contextmanager
def tcp_server(host: str, handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A server on host:<free port> running handle(conn) per connection in a thread; yields the port."""
    server = socket.create_server((host, 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listening socket closed: done
            while True:
                conn, _ = server.accept()
                threading.Thread(target=lambda c=conn: (handle(c), c.close()), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def run_client(link: ShapedLink, port: int, mode: str, n: int) -> dict:
    host, relay_port = link.endpoint(port)
    done = subprocess.run(link.wrap([sys.executable, "-c", CLIENT, host, str(relay_port), mode, str(n)]),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"client in {link.ns} failed:\n{done.stderr}"
    return json.loads(done.stdout)


@contextlib.contextmanager
def link_or_skip(**kw) -> Iterator[ShapedLink]:
    """shaped_link(**kw), or a skip saying why it cannot be built; errors after setup still fail."""
    with contextlib.ExitStack() as stack:
        try:
            link = stack.enter_context(shaped_link(**kw))
        except ShapingUnavailable as e:
            pytest.skip(str(e))
        yield link


@pytest.fixture(scope="module")
def link() -> Iterator[ShapedLink]:
    with link_or_skip(rate_mbit=RATE_MBIT, rtt_ms=RTT_MS) as link:
        print(link.describe())
        yield link


def test_bulk_transfer_takes_the_time_the_rate_allows(link):
    with tcp_server(link.bind_host, sink) as port:
        result = run_client(link, port, "up", SIZE)
    assert result["bytes"] == SIZE
    expected = SIZE * 8 / (RATE_MBIT * 1e6)
    seconds = result["seconds"][0]
    assert 0.7 * expected <= seconds <= 2 * expected, \
        f"{SIZE} B took {seconds:.2f} s; {RATE_MBIT} Mbit/s allows {expected:.2f} s ({link.describe()})"


def test_round_trip_takes_the_rtt(link):
    with tcp_server(link.bind_host, echo) as port:
        result = run_client(link, port, "ping", 5)
    fastest = min(result["seconds"]) * 1000
    assert fastest >= RTT_MS - 5, f"a round trip took {fastest:.1f} ms; the link has {RTT_MS} ms ({link.describe()})"
    assert fastest <= RTT_MS * 2, f"a round trip took {fastest:.1f} ms, far above {RTT_MS} ms"


# Runs inside the namespace: one echo before, then waits for the word "cut" on stdin, tries a
# new connection (must fail), and echoes again on the first one once healed.
PARTITIONED = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"a"); assert s.recv(1) == b"a"
print("ready", flush=True); sys.stdin.readline()
try:
    socket.create_connection((host, port), timeout=2); print("connected", flush=True)
except OSError as e:
    print("refused", type(e).__name__, flush=True)
s.settimeout(30); s.sendall(b"b"); print("echo", s.recv(1).decode(), flush=True)
"""


def test_a_partition_cuts_both_ways_and_a_heal_resumes_the_same_connection(link):
    with tcp_server(link.bind_host, echo) as port:
        host, relay_port = link.endpoint(port)
        client = subprocess.Popen(link.wrap([sys.executable, "-c", PARTITIONED, host, str(relay_port)]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "ready"
            link.partition()
            client.stdin.write("cut\n")
            client.stdin.flush()
            assert client.stdout.readline().split()[0] == "refused"  # no new connection gets through
            time.sleep(1.0)  # the byte sent on the open connection is retransmitted meanwhile
            link.heal()
            assert client.stdout.readline().strip() == "echo b"  # the old connection carries on
        finally:
            link.heal()
            client.kill()
            client.wait()
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert link.ns_ip not in routes


def test_nothing_is_left_behind_even_after_an_error():
    with pytest.raises(KeyError), link_or_skip(rate_mbit=RATE_MBIT, rtt_ms=RTT_MS) as link:
        link.endpoint(1)  # starts a relay (where one is used) that teardown must stop
        sleeper = subprocess.Popen(link.wrap(["sleep", "60"]))  # would pin the namespace
        raise KeyError("boom")
    sleeper.wait(timeout=5)  # ended by the teardown, not by us
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert link.ns not in namespaces
    assert link.host_if not in links and link.ns_if not in links
    assert not link._relays


def test_a_failed_setup_leaves_nothing_behind(monkeypatch):
    with link_or_skip(name="fslprobe"):
        pass  # skips here where namespaces cannot be made at all

    def no_qdiscs(what, *args):
        raise ShapingUnavailable(f"cannot {what}: Specified qdisc kind is unknown.")

    monkeypatch.setattr(netshape, "_tc", no_qdiscs)  # fails after the namespace and veth exist
    # a suffix no random hex suffix (another link's) can contain
    monkeypatch.setattr(netshape.secrets, "token_hex", lambda n: "zzzzzz")
    with pytest.raises(ShapingUnavailable, match="cannot shape the host end with tbf"):
        with shaped_link(name="fslf"):
            pass
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert "zzzzzz" not in namespaces and "zzzzzz" not in links


def test_unavailable_names_the_reason(monkeypatch):
    monkeypatch.setattr(netshape.os, "geteuid", lambda: 1000)
    with pytest.raises(ShapingUnavailable, match="need root; running as uid 1000"):
        with shaped_link():
            pass
