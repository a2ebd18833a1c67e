"""`fsl-edge enroll` / `revoke` / `nodes`: site identities in a cluster's Secrets or a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fsl_edge.deploy import pki
from fsl_edge.deploy.names import BROKER_CA_SECRET, BROKER_TLS_SECRET, DEFAULT_NAMESPACE
from fsl_edge.enroll import KubeStore, LocalStore, NodeStore, Site, enroll_site, list_nodes
from fsl_edge.enroll import revoke as revoke_node
from fsl_edge.enroll.store import CA_KEY
from fsl_edge.errors import ConfigError, FslError

Local = Annotated[Optional[Path], typer.Option(
    "--local", help="A folder holding the broker's passwd and acl files (a federation without a cluster).")]
Context = Annotated[Optional[str], typer.Option(
    help="kubeconfig context of the cluster (default: the current one).")]
Kubeconfig = Annotated[Optional[Path], typer.Option(
    help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config).")]
Namespace = Annotated[str, typer.Option(help="Namespace of the deployment.", envvar="FSL_NAMESPACE")]


def enroll(
    name: Annotated[str, typer.Argument(help="The node's name: lowercase letters, digits, '-'.")],
    broker: Annotated[str, typer.Option(help="HOST:PORT of the broker's TLS listener, as sites reach it.")],
    ca: Annotated[Optional[Path], typer.Option(
        help="The broker's CA certificate (PEM); with a cluster, default: its Secret.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the site bundle (default ./NAME-bundle).")] = None,
    client_cert: Annotated[Optional[bool], typer.Option(
        "--client-cert/--no-client-cert",
        help="Issue the node a client certificate from the broker CA, for a broker that demands "
             "one (mutual TLS). Default: in a cluster, whether its deployment does; locally, "
             "when --ca-key is given.")] = None,
    ca_key: Annotated[Optional[Path], typer.Option(
        help="Without a cluster: the broker CA's private key (PEM) that signs the client "
             "certificate; goes with --ca.")] = None,
    run_id: Annotated[str, typer.Option(help="The run's name on the broker.")] = "demo",
    image: Annotated[str, typer.Option(help="Agent image the site runs (default fsl-edge-agent:VERSION).")] = "",
    local: Local = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """Create a site's identity (broker user, ACL, message key, and with mutual TLS a client
    certificate) and write the bundle it runs."""
    store = _store(local, context, kubeconfig, namespace)
    ca_pem = _read_ca(ca) if ca is not None else _cluster_ca(store)
    out = out or Path(f"{name}-bundle")
    client_ca = _client_ca(store, ca, ca_pem, ca_key, client_cert)
    enroll_site(store, name, Site(broker=broker, ca_pem=ca_pem, run_id=run_id, image=image), out,
                client_ca)
    console = Console(soft_wrap=True)
    console.print(f"enrolled [bold]{escape(name)}[/] in {escape(store.where)}: broker user, ACL for "
                  "its own topics, message key" + (", client certificate" if client_ca else ""))
    console.print(f"bundle: [bold]{escape(str(out))}[/] (compose.yaml, agent.env (secret), ca.crt, "
                  + ("client.crt, client.key (secret), " if client_ca else "") + "README.md)")
    console.print(f"{_reload_hint(store)}\nnext: copy the bundle to the site and run "
                  "`docker compose up -d` in it")


def revoke(
    name: Annotated[str, typer.Argument(help="The node to revoke.")],
    local: Local = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """Remove a site's credentials: its next connection to the broker is refused."""
    store = _store(local, context, kubeconfig, namespace)
    revoke_node(store, name)
    Console(soft_wrap=True).print(f"revoked [bold]{escape(name)}[/]: password, ACL and message key "
                                  f"removed from {escape(store.where)}\n{_reload_hint(store)}")


def nodes(
    url: Annotated[Optional[str], typer.Option(
        help="The coordinator's status API, to show which nodes are online.")] = None,
    local: Local = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
    namespace: Namespace = DEFAULT_NAMESPACE,
) -> None:
    """List enrolled and revoked sites (and which are online, given --url)."""
    store = _store(local, context, kubeconfig, namespace)
    states = None
    if url is not None:
        from .status import fetch

        try:
            states = {name: a.state for name, a in fetch(url)[0].agents.items()}
        except FslError as e:  # the list is still worth showing without the online column
            Console(stderr=True, soft_wrap=True).print(f"[yellow]warning:[/] {escape(str(e))}")
    table = Table("node", "enrolled (UTC)", "state", "revoked (UTC)", box=box.SIMPLE_HEAD, pad_edge=False)
    for n in list_nodes(store, states):
        table.add_row(n.name, f"{n.enrolled_at:%Y-%m-%d %H:%M}", n.state,
                      f"{n.revoked_at:%Y-%m-%d %H:%M}" if n.revoked_at else "")
    console = Console()
    console.print(table if table.row_count else f"no nodes enrolled in {escape(store.where)} yet")


def _store(local: Path | None, context: str | None, kubeconfig: Path | None, namespace: str) -> NodeStore:
    if local is not None:
        if context is not None or kubeconfig is not None:
            raise ConfigError("--local and --context/--kubeconfig exclude each other: choose a folder or a cluster")
        return LocalStore(local)
    from fsl_edge.deploy.kube import Cluster  # the kubernetes client loads only for a cluster

    cluster = Cluster(context=context, kubeconfig=kubeconfig)
    return KubeStore(cluster, namespace, cluster.context)  # the context it resolved, for messages


def _read_ca(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the broker CA {path}: {e.strerror}") from e


def _cluster_ca(store: NodeStore) -> bytes:
    """The CA deploy stored with the broker's certificate; without a cluster, --ca is required."""
    if not isinstance(store, KubeStore):
        raise ConfigError("--ca is required: the broker's CA certificate, which the site will trust")
    ca = store.broker_ca()
    if ca is None:
        raise ConfigError(f"no broker CA in {store.where} (Secret {BROKER_TLS_SECRET}, key {CA_KEY}): "
                          "deploy the broker there first (fsl-edge deploy), or pass --ca")
    return ca


def _client_ca(store: NodeStore, ca: Path | None, ca_pem: bytes, ca_key: Path | None,
               wanted: bool | None) -> pki.KeyPair | None:
    """The CA pair that signs the node's client certificate, or None when it gets none."""
    if isinstance(store, KubeStore):
        if ca_key is not None:
            raise ConfigError("--ca-key is for a federation without a cluster: in a cluster the "
                              "CA comes from its Secret")
        if not (store.mutual_tls() if wanted is None else wanted):
            return None
        pair = store.broker_ca_pair()
        if pair is None:
            raise ConfigError(f"--client-cert needs the broker CA's key (Secret {BROKER_CA_SECRET} "
                              f"in {store.where}): deploy made none there")
        where = f"Secret {BROKER_CA_SECRET}"
    else:
        if wanted is None:
            wanted = ca_key is not None
        if not wanted:
            return None
        if ca_key is None or ca is None:
            raise ConfigError("--client-cert without a cluster needs --ca and --ca-key: the broker "
                              "CA's certificate and private key")
        try:
            pair = (ca_pem, ca_key.read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read the CA key {ca_key}: {e.strerror}") from e
        where = f"{ca} with {ca_key}"
    client_ca = pki.KeyPair(*pair)
    pki.check_ca_pair(client_ca, where)
    if client_ca.cert.strip() != ca_pem.strip():
        raise ConfigError(f"{where} is not the CA the site trusts (--ca / the broker's ca.crt)")
    return client_ca


def _reload_hint(store: NodeStore) -> str:
    if isinstance(store, LocalStore):
        return "the broker applies this when it reloads: send it SIGHUP (kill -HUP <mosquitto pid>)"
    # The kubelet refreshes a mounted Secret within about a minute; the reloader then SIGHUPs.
    return "the broker applies this within about a minute (its reloader sidecar SIGHUPs mosquitto)"
