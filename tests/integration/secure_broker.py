"""A Mosquitto as `fsl-edge deploy` runs it, on loopback: password file and ACL from a node
store, and optionally a TLS listener (a CA and a server certificate for localhost made with
fsl_edge.deploy.pki), with or without client certificates (mutual TLS)."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fsl_edge.broker import BrokerProcess, find_mosquitto, free_port
from fsl_edge.deploy import pki


@dataclass
class Tls:
    """The broker's TLS listener: its CA (which the clients trust), and whether it demands a
    client certificate (mutual TLS); `certs` maps a user to its client certificate files."""

    ca: pki.KeyPair
    ca_file: Path
    require_certificate: bool
    certs: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Broker:
    """A Mosquitto on loopback and how clients reach it."""

    process: BrokerProcess
    tls: Tls | None = None

    def __getattr__(self, name):  # host, port, proc, log
        return getattr(self.process, name)

    def __enter__(self) -> Broker:
        self.process.start()
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()


def broker_tls(workdir: Path, require_certificate: bool) -> Tls:
    """A CA and a server certificate for localhost, as deploy makes them for the cluster."""
    ca = pki.new_ca("test")
    server = pki.issue_server(ca, ["localhost", "127.0.0.1"])
    for name, content in (("ca.crt", ca.cert), ("server.crt", server.cert), ("server.key", server.key)):
        (workdir / name).write_bytes(content)
    return Tls(ca, workdir / "ca.crt", require_certificate)


def mosquitto_on(folder: Path, workdir: Path, tls: Tls | None = None) -> Broker:
    """A Mosquitto (not started) that loads folder/passwd and folder/acl, anonymous access off;
    with `tls`, its only listener is TLS (as k8s/base/config/mosquitto.conf has it)."""
    port = free_port()
    conf = workdir / f"mosquitto-{port}.conf"
    listener = [f"listener {port} 127.0.0.1"]
    if tls is not None:
        listener += [f"cafile {tls.ca_file}", f"certfile {workdir / 'server.crt'}",
                     f"keyfile {workdir / 'server.key'}", "tls_version tlsv1.2",
                     f"require_certificate {str(tls.require_certificate).lower()}"]
    conf.write_text("\n".join([
        "per_listener_settings false", "allow_anonymous false",
        f"password_file {folder / 'passwd'}", f"acl_file {folder / 'acl'}", *listener,
        # started as root, mosquitto drops to the `mosquitto` user, which cannot read 0600 files
        f"user {getpass.getuser()}",
        "persistence false", "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
    ]) + "\n")
    try:
        return Broker(BrokerProcess("mosquitto", [find_mosquitto(), "-c", str(conf)], port,
                                    workdir / f"mosquitto-{port}.log"), tls)
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
