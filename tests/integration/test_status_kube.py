"""`fsl-edge status` through the user's kubeconfig: the coordinator's Service via the API server's
service proxy, against the Kubernetes API emulator (kube_emulator) over real HTTP.

The emulator forwards the proxy request to a real `StatusServer` on a free loopback port, which
stands in for the coordinator's pod; the Service is the one k8s/ deploys.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fsl_edge.broker import free_port
from fsl_edge.cli import status as status_cli
from fsl_edge.cli.app import main
from fsl_edge.coordinator.status_http import StatusServer
from fsl_edge.deploy import names
from fsl_edge.deploy.kube import Cluster
from fsl_edge.errors import ConfigError, ProtocolError, TransportError
from fsl_edge.status import Status

from .kube_emulator import isolate_from_machine
from .test_status_http import ODD_AGENT, Controls, _NotAStatus

pytestmark = pytest.mark.integration

NS = names.DEFAULT_NAMESPACE
SERVICE = Path(__file__).parents[2] / "k8s" / "base" / "coordinator-service.yaml"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate_from_machine(tmp_path, monkeypatch)
    monkeypatch.setenv("COLUMNS", "80")


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def coordinator(kube, controls) -> Iterator[StatusServer]:
    """The coordinator's Service as k8s/ deploys it, with a real status API as its ready pod."""
    service = yaml.safe_load(SERVICE.read_text())
    service["metadata"]["namespace"] = NS
    with Cluster(kubeconfig=kube.kubeconfig) as cluster:
        cluster.apply(service)
    with StatusServer(controls.snapshot, lambda: True, port=0) as server:
        kube.api.endpoints[(NS, names.COORDINATOR, names.STATUS_PORT)] = server.url
        yield server


def status(kube, *args: str) -> int:
    return main(["status", "--kubeconfig", str(kube.kubeconfig), *args])


def proxied(kube) -> list[str]:
    """The paths of the service-proxy requests the emulated API server got."""
    return [r.url.path for r in kube.api._requests if "/proxy" in r.url.path]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_the_tables_through_the_service_proxy(kube, coordinator, capsys):
    assert status(kube, "--context", "emulated", "--namespace", NS) == 0
    out = capsys.readouterr().out
    assert "run-42" in out and "round 2/3" in out and "step 5/10" in out
    assert "site-a" in out and ODD_AGENT in out and "4.00x" in out
    assert proxied(kube) == [f"/api/v1/namespaces/{NS}/services/{names.COORDINATOR}:"
                             f"{names.STATUS_PORT}/proxy/status"]


def test_json_is_the_document(kube, coordinator, controls, capsys):
    assert status(kube, "--context", "emulated", "--json") == 0  # the default namespace
    assert Status.model_validate_json(capsys.readouterr().out) == controls.status


def test_json_watch_is_a_stream_of_documents(kube, coordinator, controls, capsys, monkeypatch):
    naps = []

    def sleep(s: float) -> None:  # Ctrl-C after the second document
        naps.append(s)
        if len(naps) == 2:
            raise KeyboardInterrupt

    clock = types.SimpleNamespace(sleep=sleep, time=status_cli.time.time)
    monkeypatch.setattr(status_cli, "time", clock)  # this module's sleep only, not the servers'

    assert status(kube, "--context", "emulated", "--json", "--watch", "--interval", "0.5") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(Status.model_validate_json(x) == controls.status for x in lines)
    assert naps == [0.5, 0.5] and len(proxied(kube)) == 2


def test_a_missing_service_is_one_line(kube, capsys):
    assert status(kube, "--context", "emulated") == ConfigError.exit_code
    line = one_error_line(capsys.readouterr().err)
    assert f"there is no Service {names.COORDINATOR}:{names.STATUS_PORT} in namespace {NS}" in line
    assert "context emulated" in line and "--namespace" in line


def test_another_namespace_has_no_coordinator(kube, coordinator, capsys):
    assert status(kube, "--namespace", "elsewhere") == ConfigError.exit_code
    assert "in namespace elsewhere" in one_error_line(capsys.readouterr().err)


def test_a_service_without_a_ready_pod_is_temporary(kube, coordinator, capsys):
    kube.api.endpoints.clear()
    assert status(kube, "--context", "emulated") == TransportError.exit_code == 75
    line = one_error_line(capsys.readouterr().err)
    assert "is not ready: no endpoints available for service" in line


def test_the_coordinators_own_errors_pass_through(kube, coordinator, controls, capsys):
    controls.fail = True  # the pod answers 500: the proxy passes it on
    assert status(kube, "--context", "emulated") == TransportError.exit_code
    assert "HTTP 500 for /status: status unavailable: RuntimeError" in one_error_line(
        capsys.readouterr().err)


def test_a_port_that_is_not_the_status_api(kube, coordinator, capsys):
    """The pod's own 404 is not the API server's (no such Service), nor is a foreign document."""
    endpoint = (NS, names.COORDINATOR, names.STATUS_PORT)
    kube.api.endpoints[endpoint] = coordinator.url + "/elsewhere"
    assert status(kube) == ProtocolError.exit_code
    line = one_error_line(capsys.readouterr().err)
    assert "answered HTTP 404 Not Found for /status: not found: try /status" in line

    other = ThreadingHTTPServer(("127.0.0.1", 0), _NotAStatus)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        kube.api.endpoints[endpoint] = f"http://127.0.0.1:{other.server_address[1]}"
        assert status(kube) == ProtocolError.exit_code
        assert (f"Service {names.COORDINATOR}:{names.STATUS_PORT} in namespace {NS} did not answer "
                "with a status document") in one_error_line(capsys.readouterr().err)
    finally:
        other.shutdown()
        other.server_close()


def test_an_unreachable_cluster_is_temporary(tmp_path, capsys):
    kubeconfig = tmp_path / "gone.yaml"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}]}))
    assert main(["status", "--kubeconfig", str(kubeconfig)]) == TransportError.exit_code == 75
    assert "cannot reach the Kubernetes API at http://127.0.0.1:" in one_error_line(
        capsys.readouterr().err)


def test_which_way_is_taken(kube, coordinator, capsys, monkeypatch):
    """The command line beats the environment; --url and a kube option, both typed, clash."""
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    monkeypatch.setenv("FSL_NAMESPACE", NS)  # alone: through the cluster
    assert main(["status", "--json"]) == 0 and len(proxied(kube)) == 1
    monkeypatch.setenv("FSL_STATUS_URL", coordinator.url)  # a URL in the environment too: the URL
    assert main(["status", "--json"]) == 0 and len(proxied(kube)) == 1
    assert main(["status", "--json", "--context", "emulated"]) == 0 and len(proxied(kube)) == 2
    capsys.readouterr()
    assert main(["status", "--url", coordinator.url, "--namespace", NS]) == ConfigError.exit_code
    assert "two ways to reach the coordinator" in one_error_line(capsys.readouterr().err)
