"""A federation as deployed, on one machine: Mosquitto over TLS demanding client certificates
(mutual TLS), a password and an ACL per node from `enroll`, every site running from its own
bundle's agent.env, messages signed with the enrolled keys. It trains to the same adapters as
the in-process simulation. (That a node reads nothing of another's, on this same broker set-up:
tests/integration/test_enroll_broker.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from fsl_edge.deploy import pki
from fsl_edge.enroll import LocalStore, Site, enroll_site

from .runtime_harness import assert_matches_simulation, assert_on_the_ledger, federation, finish
from .secure_broker import broker_tls, mosquitto_on

pytestmark = pytest.mark.integration
SITES = ("circulatory", "neoplasms")
COORDINATOR, COORDINATOR_PASSWORD = "coordinator", "coordinator-secret"


def bundle_env(bundle: Path) -> dict[str, str]:
    """The bundle's agent.env, its container paths (/etc/fsl-edge/...) moved into the bundle."""
    env = {}
    for line in (bundle / "agent.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value.replace("/etc/fsl-edge/", f"{bundle}/")
    return env


def test_a_mutual_tls_federation_of_enrolled_sites_trains_like_the_simulation(tmp_path):
    tls = broker_tls(tmp_path, require_certificate=True)
    store = LocalStore(tmp_path / "auth")
    store.folder.mkdir()
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([passwd, "-c", "-b", str(store.folder / "passwd"), COORDINATOR,
                    COORDINATOR_PASSWORD], check=True)
    (store.folder / "acl").write_text(f"user {COORDINATOR}\ntopic readwrite fsl/#\n")
    with mosquitto_on(store.folder, tmp_path, tls) as broker:
        url = f"mqtts://localhost:{broker.port}"
        fed = federation(tmp_path, url, sites=SITES, rounds=2, steps=3, signed=False)
        site = Site(broker=f"localhost:{broker.port}", ca_pem=tls.ca.cert,
                    run_id=fed.settings.runtime.run_id)
        for name in SITES:
            enroll_site(store, name, site, tmp_path / f"{name}-bundle", client_ca=tls.ca)
            fed.broker_env[name] = bundle_env(tmp_path / f"{name}-bundle")
            assert fed.broker_env[name]["FSL_BROKER"] == url
        os.kill(broker.proc.pid, signal.SIGHUP)  # loads the new users, as `enroll` tells you to
        coordinator = pki.issue_client(tls.ca, COORDINATOR)
        (tmp_path / "coordinator.crt").write_bytes(coordinator.cert)
        (tmp_path / "coordinator.key").write_bytes(coordinator.key)
        # the coordinator as its pod runs it: its login from the environment, the sites' keys
        # and its signing key from the node store enroll wrote (FSL_NODE_KEYS_DIR)
        fed.broker_env["coordinator"] = {
            "FSL_MQTT_USERNAME": COORDINATOR, "FSL_MQTT_PASSWORD": COORDINATOR_PASSWORD,
            "FSL_MQTT_CA_FILE": str(tls.ca_file), "FSL_MQTT_CERT_FILE": str(tmp_path / "coordinator.crt"),
            "FSL_MQTT_KEY_FILE": str(tmp_path / "coordinator.key"),
            "FSL_NODE_KEYS_DIR": str(store.folder)}
        try:
            fed.start()
            status = finish(fed)
        finally:
            fed.stop()
            heard = _what_reached_the_broker(broker.log())
    assert status.state == "finished" and [r.round for r in status.history] == [1, 2]
    assert all(r.participants == sorted(SITES) for r in status.history)
    # every process came in over mutual TLS with its own identity; nobody was refused
    assert {user for user, _ in heard} >= {COORDINATOR, *SITES}, heard
    assert not any(r in status.rejected for r in ("unsigned", "forged", "unknown_node")), status.rejected
    assert_matches_simulation(fed)
    assert_on_the_ledger(fed, rounds=2)


def _what_reached_the_broker(log: str) -> list[tuple[str, str]]:
    """(username, client id) of each connection Mosquitto logged (`New client connected ...
    as <id> (..., u'<user>')`)."""
    seen = []
    for line in log.splitlines():
        if "New client connected" in line and " u'" in line:
            client = line.split(" as ", 1)[1].split(" ", 1)[0]
            seen.append((line.rsplit(" u'", 1)[1].split("'", 1)[0], client))
    return seen
