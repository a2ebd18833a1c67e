"""Measure what a shaped_link() really delivers: throughput each way and the round-trip time.

The slow-link benchmark prints these next to its step times, so a figure is read against the
link it was measured on, not the one that was asked for. Needs root (network namespaces).

    .venv/bin/python bench/slowlink_probe.py                  # 20 Mbit/s, 50 ms RTT
    .venv/bin/python bench/slowlink_probe.py --rate 5 --rtt 100 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsl_edge.netshape import ShapedLink, ShapingUnavailable, shaped_link  # noqa: E402

# Runs inside the namespace. up: send n bytes, wait for the server's count; down: ask for n
# bytes, read to EOF; ping: n one-byte round trips. Timed from the first byte sent to the last
# byte confirmed, so each transfer includes one round trip.
CLIENT = """
import json, socket, sys, time
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port), timeout=60)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
if mode == "up":
    t = time.monotonic(); s.sendall(b"u" * n); s.shutdown(socket.SHUT_WR)
    assert int(s.recv(64)) == n; times.append(time.monotonic() - t)
elif mode == "down":
    t = time.monotonic(); s.sendall(b"%d\\n" % n); got = 0
    while chunk := s.recv(65536): got += len(chunk)
    assert got == n; times.append(time.monotonic() - t)
else:
    for _ in range(n):
        t = time.monotonic(); s.sendall(b"p"); assert s.recv(1) == b"p"; times.append(time.monotonic() - t)
print(json.dumps(times))
"""


@dataclass
class LinkFigures:
    up_mb_s: float
    down_mb_s: float
    rtt_ms: float
    """Median of the pings."""
    method: str


def _handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first = conn.recv(1)
    if first == b"u":  # upload: count to EOF, then confirm
        count = 1
        while data := conn.recv(65536):
            count += len(data)
        conn.sendall(str(count).encode())
    elif first == b"p":  # ping: echo
        while first:
            conn.sendall(first)
            first = conn.recv(64)
    else:  # download: "<n>\n"
        request = first
        while not request.endswith(b"\n"):
            request += conn.recv(64)
        conn.sendall(b"d" * int(request))


@contextlib.contextmanager
def _server(host: str, handle: Callable[[socket.socket], None]) -> Iterator[int]:
    server = socket.create_server((host, 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # raised once the listening socket is closed
            while True:
                conn, _ = server.accept()
                threading.Thread(target=lambda c=conn: (handle(c), c.close()), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _client(link: ShapedLink, port: int, mode: str, n: int) -> list[float]:
    host, relay_port = link.endpoint(port)
    done = subprocess.run(link.wrap([sys.executable, "-c", CLIENT, host, str(relay_port), mode, str(n)]),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"probe client ({mode}) in {link.ns} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def measure(link: ShapedLink, size: int = 2_500_000, pings: int = 10) -> LinkFigures:
    """Throughput each way (MB/s, 1e6 bytes, one RTT included) and the median RTT of `link`."""
    with _server(link.bind_host, _handle) as port:
        up = _client(link, port, "up", size)[0]
        down = _client(link, port, "down", size)[0]
        rtts = _client(link, port, "ping", pings)
    return LinkFigures(size / up / 1e6, size / down / 1e6, statistics.median(rtts) * 1000, link.method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20, help="Mbit/s each way")
    parser.add_argument("--rtt", type=float, default=50, help="round-trip time, ms")
    parser.add_argument("--size", type=int, default=2_500_000, help="bytes per throughput transfer")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        with shaped_link(rate_mbit=args.rate, rtt_ms=args.rtt) as link:
            figures = measure(link, args.size, pings=10)
            described = link.describe()
    except ShapingUnavailable as e:
        sys.exit(f"no shaped link here: {e}")
    if args.json:
        print(json.dumps({**asdict(figures), "asked": described}))
        return
    print(f"asked:      {described}")
    print(f"throughput: {figures.up_mb_s:.2f} MB/s up, {figures.down_mb_s:.2f} MB/s down "
          f"(the rate allows {args.rate / 8:.2f} MB/s)")
    print(f"rtt:        {figures.rtt_ms:.1f} ms (median of 10)")


if __name__ == "__main__":
    main()
