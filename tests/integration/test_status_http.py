"""The status API over real HTTP, and `fsl-edge status` against it.

A real `StatusServer` on a free loopback port, read with urllib like any scraper or the CLI would.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fsl_edge.cli.app import main
from fsl_edge.coordinator.status_http import StatusServer
from fsl_edge.errors import ProtocolError, TransportError
from fsl_edge.status import AgentStatus, RoundRecord, Status, Traffic

pytestmark = pytest.mark.integration

ODD_AGENT = 'clinic "north"\\7'  # a quote and a backslash, both escaped in label values
ODD_REASON = "bad\nshape"  # a newline, escaped too
MIB = 2**20


def make_status() -> Status:
    now = time.time()
    site_a = AgentStatus(
        state="training", last_seen=now - 3, round=2, step=5, loss=2.5, tokens=1000,
        tokens_per_s=250.0, rounds_contributed=1, layers=[(0, [0, 1, 5]), (1, [5])],
        cache={"hits": 30, "misses": 10, "entries": 10, "hit_rate": 0.75},
        traffic={"activation_up": Traffic(messages=10, bytes=MIB, raw_bytes=4 * MIB),
                 "gradient_down": Traffic(messages=10, bytes=2 * MIB, raw_bytes=4 * MIB)})
    odd = AgentStatus(state="offline", last_seen=now - 120, round=1, step=10, tokens=400,
                      rounds_contributed=1, updates_flagged=2)
    return Status(
        run="run-42", state="training", round=2, rounds=3, step=5, steps=10,
        model="tiny-random-llama", mode="u-shape", started_at=now - 60, updated_at=now,
        agents={"site-a": site_a, ODD_AGENT: odd},
        traffic={"activation_up": Traffic(messages=20, bytes=2 * MIB, raw_bytes=8 * MIB),
                 "gradient_down": Traffic(messages=20, bytes=2 * MIB, raw_bytes=8 * MIB)},
        history=[RoundRecord(round=1, participants=["site-a", ODD_AGENT], train_loss=3.0,
                             heldout_loss=2.9, tokens=1400, seconds=12.5),
                 RoundRecord(round=2, participants=["site-a"], train_loss=2.6, tokens=1000,
                             seconds=7.25)],
        rejected={"malformed": 2, ODD_REASON: 1},
        layers=[(0, list(range(2, 29))), (1, [3, 7, 9])],
        prefix_store={"entries": 12, "bytes": 3 * MIB})


class Controls:
    """What the test flips while the server runs."""

    def __init__(self) -> None:
        self.status = make_status()
        self.ready = False
        self.fail = False

    def snapshot(self) -> Status:
        if self.fail:
            raise RuntimeError("registry lock poisoned")
        return self.status


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def server(controls: Controls) -> Iterator[StatusServer]:
    with StatusServer(controls.snapshot, lambda: controls.ready, port=0) as srv:
        yield srv


def get(url: str) -> tuple[int, str, str]:
    """(status code, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> tuple[dict, list[str], list[str]]:
    """Samples as {(name, frozenset(labels)): value}, and the names on HELP and TYPE lines."""
    samples, helps, types = {}, [], []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.append(line.split()[2])
        elif line.startswith("# TYPE "):
            types.append(line.split()[2])
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            labels = {k: _unescape(v) for k, v in LABEL.findall(m.group(2) or "")}
            samples[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return samples, helps, types


def test_status_json_round_trips(server: StatusServer, controls: Controls) -> None:
    code, ctype, body = get(server.url + "/status")
    assert (code, ctype) == (200, "application/json")
    got = Status.model_validate(json.loads(body))
    assert got == controls.status
    assert set(got.agents) == {"site-a", ODD_AGENT}
    assert got.agents["site-a"].traffic["gradient_down"].bytes == 2 * MIB
    assert got.compression_ratio == 4.0


def test_metrics(server: StatusServer) -> None:
    code, ctype, body = get(server.url + "/metrics")
    assert (code, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert body.endswith("\n")
    samples, helps, types = parse_metrics(body)

    def value(name: str, **labels: str) -> float:
        return samples[("fsl_edge_" + name, frozenset(labels.items()))]

    assert value("round") == 2 and value("rounds") == 3 and value("step") == 5
    assert value("agents", state="training") == 1 and value("agents", state="offline") == 1
    assert value("agents", state="online") == 0
    assert value("agent_up", agent="site-a") == 1 and value("agent_up", agent=ODD_AGENT) == 0
    assert value("agent_loss", agent="site-a") == 2.5
    assert ("fsl_edge_agent_loss", frozenset({("agent", ODD_AGENT)})) not in samples  # unknown
    assert value("agent_tokens_total", agent=ODD_AGENT) == 400
    assert value("agent_tokens_per_second", agent="site-a") == 250
    assert value("agent_payload_bytes_total", agent="site-a", direction="up") == MIB
    assert value("agent_payload_bytes_total", agent="site-a", direction="down") == 2 * MIB
    assert value("messages_total", kind="activation_up") == 20
    assert value("payload_bytes_total", kind="gradient_down") == 2 * MIB
    assert value("raw_bytes_total", kind="gradient_down") == 8 * MIB
    assert value("compression_ratio") == 4.0
    assert value("rejected_messages_total", reason="malformed") == 2
    assert value("rejected_messages_total", reason=ODD_REASON) == 1
    assert value("round_seconds") == 7.25
    assert value("heldout_loss") == 2.9  # round 2 measured none: the last known one
    assert value("info", run="run-42", state="training", model="tiny-random-llama",
                 mode="u-shape") == 1

    # The escaping on the wire, not only after our own parser undid it.
    assert 'agent="clinic \\"north\\"\\\\7"' in body
    assert 'reason="bad\\nshape"' in body
    # HELP and TYPE once per family, and every sample belongs to a declared family.
    assert len(helps) == len(set(helps)) and helps == types
    assert {name for name, _ in samples} <= set(helps)
    assert "# TYPE fsl_edge_agent_tokens_total counter" in body
    assert "# TYPE fsl_edge_round gauge" in body


def test_health_readiness_and_unknown_paths(server: StatusServer, controls: Controls) -> None:
    assert get(server.url + "/healthz")[::2] == (200, "ok\n")
    assert get(server.url + "/readyz")[0] == 503
    controls.ready = True
    assert get(server.url + "/readyz")[0] == 200
    assert get(server.url + "/nope")[0] == 404
    assert get(server.url + "/")[0] == 404


def test_failing_snapshot_is_a_500_and_the_server_survives(server: StatusServer,
                                                          controls: Controls) -> None:
    controls.fail = True
    for path in ("/status", "/metrics"):
        code, _, body = get(server.url + path)
        assert code == 500 and "RuntimeError" in body
    assert get(server.url + "/healthz")[0] == 200
    controls.fail = False
    assert get(server.url + "/status")[0] == 200


def test_cli_shows_the_tables(server: StatusServer, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # the tables are laid out to fit 80 columns whole
    assert main(["status", "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "run-42" in out and "round 2/3" in out and "step 5/10" in out
    assert "site-a" in out and ODD_AGENT in out
    assert "3s ago" in out and "2m ago" in out
    assert "4.00x" in out  # compression ratio
    assert "rejected: bad\nshape 1, malformed 2" in out
    # layer selection per party and the prefix cache
    assert "layers and cache" in out and "3, 7, 9" in out and "hit rate 75 % of 40" in out
    assert "holds 12 (3.0 MiB)" in out
    # contribution totals per node, the largest first, with the updates the screening flagged
    lines = [line.strip() for line in out.splitlines()]
    rows = [line.split() for line in lines[lines.index("contributions"):]]
    assert rows.index(["site-a", "1", "1000", "71.4", "%", "0"]) < rows.index(
        [*ODD_AGENT.split(), "1", "400", "28.6", "%", "2"])


def test_cli_json_is_a_status(server: StatusServer, capsys) -> None:
    assert main(["status", "--url", server.url, "--json"]) == 0
    got = Status.model_validate_json(capsys.readouterr().out)
    assert got.run == "run-42" and set(got.agents) == {"site-a", ODD_AGENT}


def test_cli_reads_the_url_from_the_environment(server: StatusServer, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FSL_STATUS_URL", server.url)
    assert main(["status", "--json"]) == 0
    assert Status.model_validate_json(capsys.readouterr().out).run == "run-42"


def test_cli_unreachable_url_is_a_transport_error(capsys) -> None:
    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["status", "--url", url]) == TransportError.exit_code == 75
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and url in error_lines[0]
    assert "connection refused" in err


class _NotAStatus(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b'{"hello": "world"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_cli_rejects_what_is_not_the_status_api(server: StatusServer, capsys) -> None:
    wrong_path = server.url + "/nope"
    assert main(["status", "--url", wrong_path]) == ProtocolError.exit_code
    assert wrong_path in capsys.readouterr().err

    other = ThreadingHTTPServer(("127.0.0.1", 0), _NotAStatus)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        assert main(["status", "--url", url]) == ProtocolError.exit_code
        err = " ".join(capsys.readouterr().err.split())
        assert f"{url}/status did not answer with a status document" in err
    finally:
        other.shutdown()
        other.server_close()


def test_cli_5xx_is_temporary(server: StatusServer, controls: Controls, capsys) -> None:
    controls.fail = True
    assert main(["status", "--url", server.url]) == TransportError.exit_code
    err = " ".join(capsys.readouterr().err.split())  # rich wraps stderr at 80 columns
    assert "HTTP 500: status unavailable: RuntimeError" in err
