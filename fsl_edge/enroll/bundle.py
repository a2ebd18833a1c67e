"""The site bundle `fsl-edge enroll` writes: compose.yaml, agent.env, ca.crt and a README (and
with mutual TLS the node's client.crt and client.key).

The bundle is staged in a hidden sibling folder and renamed into place only after the store has
saved the identity, so a failed enroll leaves neither a bundle nor an identity behind. agent.env
carries the coordinator's public key, so the site obeys only messages the coordinator signed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from contextlib import suppress
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from fsl_edge import auth
from fsl_edge.atomic import write_atomic
from fsl_edge.deploy import pki
from fsl_edge.deploy.names import COORDINATOR_SIGNING_SECRET, SIGNING_PUBLIC_KEY
from fsl_edge.errors import ConfigError, ProtocolError

from .nodes import Identity, check_name, plan_enroll
from .store import KubeStore, LocalStore, NodeStore

SECRET_MODE, PUBLIC_MODE = 0o600, 0o644
# Where things are inside the agent container (docker/Dockerfile.agent creates them).
CA_PATH, DATA_DIR, MODELS_DIR, STATE_DIR = "/etc/fsl-edge/ca.crt", "/data", "/models", "/state"
CERT_PATH, KEY_PATH = "/etc/fsl-edge/client.crt", "/etc/fsl-edge/client.key"  # mutual TLS only
DATA_FILE = "train.jsonl"
AGENT_UID = 10001  # the image's non-root user, which must be able to read the site's data


def default_image() -> str:
    try:
        return f"fsl-edge-agent:{version('fsl-edge')}"
    except PackageNotFoundError:
        return "fsl-edge-agent:latest"


@dataclass(frozen=True)
class Site:
    """How a site reaches the federation; the same for every node of one deployment."""

    broker: str
    """host:port of the broker's TLS listener as the site sees it."""
    ca_pem: bytes
    """The broker's CA certificate (PEM): the site trusts this CA only."""
    run_id: str = "demo"
    image: str = ""
    """The agent image; empty: fsl-edge-agent:<this version>."""

    def __post_init__(self) -> None:
        broker_address(self.broker)
        if b"-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ConfigError("the broker CA is not a PEM certificate (no '-----BEGIN CERTIFICATE-----')")
        from fsl_edge import protocol  # it imports torch: only when a site is enrolled

        try:
            protocol.check_id(self.run_id, "run id")
        except ProtocolError as e:
            raise ConfigError(str(e)) from e

    @property
    def broker_url(self) -> str:
        host, port = broker_address(self.broker)
        return f"mqtts://{f'[{host}]' if ':' in host else host}:{port}"


def broker_address(address: str) -> tuple[str, int]:
    """host:port ([v6]:port too) -> (host, port); ConfigError naming what is wrong."""
    try:
        parts = urllib.parse.urlsplit("//" + address)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise ConfigError(f"--broker {address!r} is not HOST:PORT: {e}") from e
    if not host or not port or parts.path or parts.username or "/" in address:
        raise ConfigError(f"--broker {address!r} is not HOST:PORT (for example broker.example.org:8883)")
    return host, port


def render(identity: Identity, site: Site, coordinator_key: str,
           client: pki.KeyPair | None = None) -> dict[str, tuple[bytes, int]]:
    """Bundle file name -> (content, mode). agent.env and client.key hold secrets; they are 0600.
    `coordinator_key`: the public key of the coordinator's signing key (base64); `client`: the
    node's client certificate and key, for a broker that demands one (mutual TLS)."""
    mtls = client is not None
    files = {
        "compose.yaml": (compose_yaml(identity.name, site, mtls).encode(), PUBLIC_MODE),
        "agent.env": (agent_env(identity, site, coordinator_key, mtls).encode(), SECRET_MODE),
        "ca.crt": (site.ca_pem, PUBLIC_MODE),  # a CA certificate is public; the container reads it
        "README.md": (readme(identity.name, site, mtls).encode(), PUBLIC_MODE),
    }
    if client is not None:
        files |= {"client.crt": (client.cert, PUBLIC_MODE), "client.key": (client.key, SECRET_MODE)}
    return files


def compose_yaml(name: str, site: Site, mtls: bool = False) -> str:
    service = {
        "image": site.image or default_image(),
        "restart": "unless-stopped",
        "env_file": "agent.env",
        # Flags for what `fsl-edge agent` reads today only from its command line.
        "command": ["--data", f"{DATA_DIR}/{DATA_FILE}", "--run-id", site.run_id, "--workdir", STATE_DIR],
        "volumes": [
            _bind("./data", DATA_DIR), _bind("./models", MODELS_DIR), _bind("./ca.crt", CA_PATH),
            *([_bind("./client.crt", CERT_PATH), _bind("./client.key", KEY_PATH)] if mtls else []),
            # A named volume starts with the image's folder and its owner (the non-root user);
            # the activation cache lives in it too (<workdir>/cache).
            {"type": "volume", "source": "state", "target": STATE_DIR},
        ],
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}},
    }
    doc = {"name": f"fsl-edge-{name}", "services": {"agent": service}, "volumes": {"state": {}}}
    return (f"# fsl-edge agent for site {name}. Start it with: docker compose up -d\n"
            + yaml.safe_dump(doc, sort_keys=False))


def _bind(source: str, target: str) -> dict:
    return {"type": "bind", "source": source, "target": target, "read_only": True}


def agent_env(identity: Identity, site: Site, coordinator_key: str, mtls: bool = False) -> str:
    """The agent's FSL_ environment. Compose reads this file on the host; keep it 0600.

    FSL_MQTT_* are the names the coordinator's pod uses for its own broker login (k8s/).
    """
    lines = [
        f"# fsl-edge agent {identity.name}, enrolled {identity.enrolled_at.isoformat(timespec='seconds')}.",
        "# Secret: this site's broker password and message key. Never commit or copy it elsewhere.",
        f"FSL_AGENT_ID={identity.name}",
        f"FSL_BROKER={site.broker_url}",
        f"FSL_MQTT_USERNAME={identity.name}",
        f"FSL_MQTT_PASSWORD={identity.password}",
        f"FSL_MQTT_CA_FILE={CA_PATH}",
        *([f"FSL_MQTT_CERT_FILE={CERT_PATH}", f"FSL_MQTT_KEY_FILE={KEY_PATH}"] if mtls else []),
        f"{auth.NODE_KEY_ENV}={identity.node_key}",
        f"{auth.COORDINATOR_PUBKEY_ENV}={coordinator_key}",
        f"FSL_MODELS_DIR={MODELS_DIR}",
    ]
    return "\n".join(lines) + "\n"


def readme(name: str, site: Site, mtls: bool = False) -> str:
    image = site.image or default_image()
    key_note = (f"\n   The broker also asks for this node's certificate (`client.crt`, `client.key`):\n"
                f"   `client.key` is secret (0600); let the agent read it: `sudo chown {AGENT_UID} client.key`."
                if mtls else "")
    return f"""# fsl-edge site bundle: {name}

This folder makes this machine the federation's node `{name}`: an edge agent that trains on
this site's data on the local NVIDIA GPU. The data never leaves the machine; the agent reaches
the federation's broker at `{site.broker_url}` (TLS, trusting only `ca.crt`).

1. Put the site's training file at `data/{DATA_FILE}` (the format `fsl-edge agent --data` reads).
   The agent runs as uid {AGENT_UID}: the file must be readable by it. Optionally put a local copy
   of the base model in `models/<model name>/`.
2. Make the image `{image}` available on this machine (`docker pull`, or build it from the
   fsl-edge repository with `docker build -f docker/Dockerfile.agent -t {image} .`).{key_note}
3. Start it:

       docker compose up -d

It restarts by itself unless stopped (`docker compose down`); `docker compose logs -f agent`
shows what it does. Its state and activation cache live in the Docker volume `state`, so it
resumes after a restart. The GPU is reserved through the NVIDIA Container Toolkit; on a machine
without one, delete the `deploy:` section of `compose.yaml` and it runs on the CPU.

`agent.env` holds this node's broker password and message key, and the coordinator's public
key the agent checks every instruction against: keep it readable by its owner only, never
commit it or copy it elsewhere. If it leaks, ask the federation's operator to run
`fsl-edge revoke {name}` and to enroll this site under a new name.
"""


def enroll_site(store: NodeStore, name: str, site: Site, out: Path,
                client_ca: pki.KeyPair | None = None) -> Identity:
    """Enroll `name` in the store and write its bundle to `out`; all of it or nothing.
    `client_ca`: the broker CA with its key, to issue the node a client certificate (mTLS)."""
    check_name(name)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder: choose another --out")
    old = store.load()
    new, identity = plan_enroll(old, name)
    client = pki.issue_client(client_ca, name) if client_ca is not None else None
    staged = _stage(render(identity, site, coordinator_key(store), client), out)
    saved = False
    try:
        store.save(old, new)
        saved = True
        if out.exists():
            out.rmdir()  # the empty folder checked above: os.rename does not replace folders
        os.rename(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        if saved:
            with suppress(Exception):
                store.save(new, old)
        raise
    return identity


def coordinator_key(store: NodeStore) -> str:
    """The public key of the coordinator's signing key, which the site checks its messages with.

    In a cluster, from the Secret `fsl-edge deploy` made; in a local store, from the key file the
    first enroll makes there (the coordinator reads it through FSL_NODE_KEYS_DIR=<the folder>)."""
    if isinstance(store, KubeStore):
        data = store.client.read_secret(store.namespace, COORDINATOR_SIGNING_SECRET) or {}
        key = data.get(SIGNING_PUBLIC_KEY, b"").decode(errors="replace").strip()
        if not key:
            raise ConfigError(f"no coordinator signing key in {store.where} (Secret "
                              f"{COORDINATOR_SIGNING_SECRET}): deploy the coordinator there first "
                              "(fsl-edge deploy)")
        auth.public_key(key, f"the public key in Secret {COORDINATOR_SIGNING_SECRET}")
        return key
    if isinstance(store, LocalStore):
        path = store.folder / auth.SIGNING_KEY_FILE
        try:
            if not path.is_file():
                store.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_atomic(path, auth.new_signing_key() + "\n")  # 0600, like the store's files
            return auth.public_key_of(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot make or read the coordinator's signing key {path}: "
                              f"{e.strerror}") from e
    raise ConfigError(f"{type(store).__name__} has no coordinator signing key")


def _stage(files: dict[str, tuple[bytes, int]], out: Path) -> Path:
    """Write the bundle into a new hidden folder beside `out` (mode 0700); return it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"cannot write the bundle next to {out}: {e.strerror}") from e
    try:
        for sub in ("data", "models"):
            (staged / sub).mkdir()
        for name, (content, mode) in files.items():
            fd = os.open(staged / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.chmod(staged / name, mode)  # whatever the umask
    except BaseException as e:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"cannot write the bundle in {out.parent}: {e.strerror}") from e
        raise
    return staged
