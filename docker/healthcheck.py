"""Docker HEALTHCHECK for the fsl-edge images: exit 0 when healthy, 1 with the reason otherwise.

coordinator: its status API answers /healthz (FSL_HEALTH_URL, default on port 8780).
agent: the broker in FSL_BROKER accepts a TCP connection. The agent serves nothing locally, so
this answers the question a site operator has first: can this machine reach the federation?
Standard library only: it runs every 30 s and must not import torch.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse
import urllib.request

TIMEOUT_S = 5.0


def coordinator() -> str | None:
    url = os.environ.get("FSL_HEALTH_URL", "http://127.0.0.1:8780/healthz")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 (a fixed local URL)
            return None if resp.status == 200 else f"{url} answered HTTP {resp.status}"
    except OSError as e:
        return f"{url}: {e}"


def agent() -> str | None:
    url = os.environ.get("FSL_BROKER", "")
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return f"FSL_BROKER={url!r} names no broker"
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    try:
        socket.create_connection((parts.hostname, port), timeout=TIMEOUT_S).close()
    except OSError as e:
        return f"cannot reach the broker at {parts.hostname}:{port}: {e}"
    return None


if __name__ == "__main__":
    checks = {"agent": agent, "coordinator": coordinator}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: healthcheck.py {'|'.join(checks)}")
    problem = checks[sys.argv[1]]()
    if problem:
        sys.exit(problem)  # exit status 1, the reason in `docker inspect`'s health log
