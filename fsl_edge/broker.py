"""Local MQTT brokers as child processes: Mosquitto with its own config, or the embedded amqtt.

`fsl-edge up` runs one for a federation on one machine; the tests and benchmarks start theirs
the same way, on free loopback ports. `BrokerProcess.stop()` and `start()` keep the port, so a
broker can be taken down mid-run and brought back where clients expect it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str:
    """Path of the mosquitto binary; FileNotFoundError saying how to install it otherwise."""
    for path in (*MOSQUITTO_PATHS, shutil.which("mosquitto")):
        if path and Path(path).is_file():
            return path
    raise FileNotFoundError(
        "mosquitto is not installed; the integration tests need a real broker. "
        "Run scripts/setup.sh (it installs it), or: apt-get install -y mosquitto"
    )


@dataclass
class BrokerProcess:
    """A broker subprocess; its output goes to log_path, shown when it fails to start."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        """Spawn the broker and return once it accepts TCP connections."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start:\n{self.log()}")
            # A bare TCP connect proves the listener is up (amqtt logs the empty session as an error).
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} did not listen on {self.host}:{self.port} within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (kill it if it lingers); safe to call twice."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def __enter__(self) -> BrokerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mosquitto_broker(workdir: Path, *, max_packet_size: int | None = None, port: int | None = None,
                     host: str = "127.0.0.1") -> BrokerProcess:
    """A Mosquitto with its own config in workdir (not started: use `with` or start()).

    host: the address it listens on; a shaped link with netem needs its veth address
    (netshape.ShapedLink.bind_host), since the namespace cannot reach the host's loopback.
    """
    port = port or free_port()
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        # every step is a small request and its reply: Nagle's algorithm with delayed ACKs adds
        # ~40 ms to each delivery (fsl_edge/transport.py sets the same on the clients)
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if max_packet_size is not None:
        lines.append(f"max_packet_size {max_packet_size}")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"mosquitto-{port}.conf"
    conf.write_text("\n".join(lines) + "\n")
    return BrokerProcess("mosquitto", [find_mosquitto(), "-c", str(conf)], port, workdir / f"mosquitto-{port}.log",
                         host=host)


def amqtt_broker(workdir: Path, *, port: int | None = None) -> BrokerProcess:
    """The pure-Python amqtt broker (MQTT 3.1.1 only) in a child process (not started).

    A child interpreter keeps amqtt's asyncio loop, threads and logging out of the caller, and
    stop() ends it like any other broker.
    """
    port = port or free_port()
    return BrokerProcess("amqtt", [sys.executable, "-m", "fsl_edge.broker", str(port)], port,
                         workdir / f"amqtt-{port}.log")


def local_broker(workdir: Path, prefer_mosquitto: bool = True) -> BrokerProcess:
    """The broker `fsl-edge up` runs: a local mosquitto when installed, else embedded amqtt."""
    workdir.mkdir(parents=True, exist_ok=True)
    if prefer_mosquitto:
        with contextlib.suppress(FileNotFoundError):
            return mosquitto_broker(workdir)
    return amqtt_broker(workdir)


def serve_amqtt(port: int) -> None:
    import asyncio
    import logging

    from amqtt.broker import Broker

    async def main() -> None:
        broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        })
        await broker.start()
        await asyncio.Event().wait()

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())


if __name__ == "__main__":
    serve_amqtt(int(sys.argv[1]))


