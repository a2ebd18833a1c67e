"""`fsl-edge status`: show a running coordinator's status API as tables, once or live.

Two ways to the coordinator: HTTP to --url, or, given --context, --kubeconfig or --namespace,
its Service through the Kubernetes API server's service proxy with the user's kubeconfig.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import pydantic
import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fsl_edge.deploy.kube import Cluster
from fsl_edge.deploy.names import COORDINATOR, DEFAULT_NAMESPACE, STATUS_PORT
from fsl_edge.errors import ConfigError, ProtocolError, TemporaryError, TransportError
from fsl_edge.status import AgentStatus, Status, Traffic, direction

from .enroll import Context, Kubeconfig

DEFAULT_URL = "http://127.0.0.1:8780"
TIMEOUT_S = 5.0
HISTORY_ROWS = 5
MIB = 2**20
STATE_STYLES = {"training": "green", "online": "cyan", "offline": "red", "dropped": "red",
                "finished": "bold green", "failed": "bold red", "waiting": "yellow"}


def fetch(url: str) -> tuple[Status, str]:
    """GET `<url>/status`; return the validated status and the body as received."""
    endpoint = _endpoint(url)
    try:
        with urllib.request.urlopen(endpoint, timeout=TIMEOUT_S) as resp:
            body = resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        raise _http_error(url, e) from e
    except (urllib.error.URLError, OSError) as e:
        raise TransportError(f"cannot reach the coordinator's status API at {url}: {_reason(e)}; "
                             "is it running? (--url)") from e
    except http.client.InvalidURL as e:  # what urlsplit lets through, such as a space
        raise ConfigError(f"--url {url!r} is not a valid URL: {e}") from e
    except http.client.HTTPException as e:  # something answered, but not in HTTP
        raise ProtocolError(f"{url} does not speak HTTP ({type(e).__name__}); is --url the status "
                            "API rather than the broker?") from e
    return _parse(body, endpoint)


def fetch_service(cluster: Cluster, namespace: str) -> tuple[Status, str]:
    """GET `status` from the coordinator's Service through the API server's service proxy."""
    body = cluster.proxy_get(namespace, COORDINATOR, STATUS_PORT, "status")
    return _parse(body.decode("utf-8", errors="replace"),
                  f"Service {COORDINATOR}:{STATUS_PORT} in namespace {namespace}")


def _parse(body: str, source: str) -> tuple[Status, str]:
    """The status document in `body`, validated, and `body` as received; `source` is who sent it."""
    try:
        return Status.model_validate_json(body), body
    except pydantic.ValidationError as e:
        raise ProtocolError(f"{source} did not answer with a status document "
                            f"({e.error_count()} errors, first: {e.errors()[0]['msg']})") from e


def _endpoint(url: str) -> str:
    """`<url>/status`, after checking that `url` is an http(s) URL with a valid port."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError when out of range)
    except ValueError as e:
        raise ConfigError(f"--url {url!r} is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r} is not an HTTP URL such as http://127.0.0.1:8780")
    base = url.rstrip("/")
    return base if base.endswith("/status") else base + "/status"


def _http_error(url: str, e: urllib.error.HTTPError) -> Exception:
    if e.code >= 500:
        # The coordinator is there but could not build its status: it may next time.
        detail = e.read().decode("utf-8", errors="replace").strip()[:200] or e.reason
        return TransportError(f"the status API at {url} answered HTTP {e.code}: {detail}")
    return ProtocolError(f"{url} answered HTTP {e.code} {e.reason} for /status; is --url the "
                         "coordinator's status API?")


def _reason(e: Exception) -> str:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT_S:.0f} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()  # "connection refused", not "[Errno 111] Connection refused"
    return str(reason)


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = int(max(0.0, now - t))  # clamp: the coordinator's clock may run slightly ahead of ours
    if s < 60:
        return f"{s}s ago"
    return f"{s // 60}m ago" if s < 3600 else f"{s / 3600:.1f}h ago"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def _mib(agent: AgentStatus, way: str) -> str:
    return f"{sum(t.bytes for k, t in agent.traffic.items() if direction(k) == way) / MIB:.2f}"


def _ratio(t: Traffic) -> str:
    return f"{t.raw_bytes / t.bytes:.2f}x" if t.bytes else "-"


def _table(title: str, *columns: str, text: int = 1) -> Table:
    """A compact table; the first `text` columns are names, the rest right-aligned numbers."""
    # Collapsed padding and no box edges: nine columns must fit an 80-column terminal.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=True, justify="left" if i < text else "right")
    return table


def header(s: Status) -> Text:
    ratio = f"{s.compression_ratio:.2f}x" if s.compression_ratio else "-"
    text = Text.assemble((s.run, "bold"), "  ", _state(s.state))
    text.append(f"  round {s.round}/{s.rounds}  step {s.step}/{s.steps}  model {s.model or '-'}"
                f"  mode {s.mode or '-'}  compression {ratio}")
    return text


def agents_table(s: Status, now: float) -> Table:
    # Two-line headers keep the nine columns inside 80 characters.
    table = _table("agents", "agent", "state", "last\nseen", "round/\nstep", "loss", "tokens",
                   "tok/s", "MiB\nup", "MiB\ndown", text=2)
    for name, a in sorted(s.agents.items()):
        table.add_row(Text(name), _state(a.state), _ago(a.last_seen, now), f"{a.round}/{a.step}",
                      _num(a.loss), str(a.tokens), _num(a.tokens_per_s, ".0f"),
                      _mib(a, "up"), _mib(a, "down"))
    return table


def contributions_table(s: Status) -> Table:
    """What each site has given the federation: rounds, tokens and their share, and how many of
    its updates the screening flagged (the ledger, `fsl-edge audit contributions`, has the
    accepted ones round by round)."""
    total = sum(a.tokens for a in s.agents.values())
    table = _table("contributions", "agent", "rounds", "tokens", "share", "flagged\nupdates")
    for name, a in sorted(s.agents.items(), key=lambda item: (-item[1].tokens, item[0])):
        table.add_row(Text(name), str(a.rounds_contributed), str(a.tokens),
                      f"{a.tokens / total * 100:.1f} %" if total else "-",
                      Text(str(a.updates_flagged), style="yellow" if a.updates_flagged else ""))
    return table


def traffic_table(s: Status) -> Table:
    table = _table("traffic", "kind", "messages", "MiB sent", "MiB raw", "ratio")
    for kind, t in sorted(s.traffic.items()):
        table.add_row(kind, str(t.messages), f"{t.bytes / MIB:.2f}", f"{t.raw_bytes / MIB:.2f}",
                      _ratio(t))
    return table


def history_table(s: Status) -> Table:
    table = _table(f"last {HISTORY_ROWS} rounds", "round", "participants", "train loss",
                   "held-out loss", "s", "MiB", "ratio", text=2)
    for r in s.history[-HISTORY_ROWS:]:
        ratio = f"{r.raw_bytes / r.wire_bytes:.2f}x" if r.wire_bytes else "-"
        table.add_row(str(r.round), ", ".join(r.participants), _num(r.train_loss),
                      _num(r.heldout_loss), f"{r.seconds:.1f}", f"{r.wire_bytes / MIB:.2f}", ratio)
    return table


def selection_table(s: Status) -> Table | None:
    """Layer selection and the prefix cache, where the run has either."""
    rows = [("trunk", s.layers, s.prefix_store)] + [(name, a.layers, a.cache)
                                                  for name, a in sorted(s.agents.items())]
    # a run that selects nothing (policy all) and caches nothing has nothing to show here
    if not any(len(layers) > 1 or cache.get("entries") for _, layers, cache in rows):
        return None
    table = _table("layers and cache", "party", "epoch", "trainable LoRA blocks", "cache")
    for name, layers, cache in rows:
        epoch, blocks = layers[-1] if layers else (None, [])
        if name == "trunk":
            kept = f"holds {cache.get('entries', 0)} ({cache.get('bytes', 0) / MIB:.1f} MiB)" if cache else "-"
        else:
            kept = f"hit rate {cache['hit_rate'] * 100:.0f} % of {int(cache['hits'] + cache['misses'])}" \
                if cache.get("hit_rate") is not None and "hits" in cache else "-"
        table.add_row(name, "-" if epoch is None else str(epoch), _blocks(blocks), kept)
    return table


def planner_table(s: Status) -> Table | None:
    """The planner's cut, rank and codec per agent, its predicted seconds per step and the
    measured ones (round start to upload, per step), where the run has a plan."""
    if not isinstance(s.planner, dict):
        return None
    plan, nodes = s.planner, s.planner.get("nodes")
    title = (f"planner (makespan {_seconds(plan.get('makespan_s'))} s, "
             f"bottleneck {plan.get('bottleneck', '-')})")
    table = _table(title, "agent", "cut", "rank", "codec", "predicted\ns/step", "measured\ns/step",
                   "link planned\nup/down MB/s, rtt", "link now\nup/down MB/s, rtt")
    for name, node in sorted(nodes.items() if isinstance(nodes, dict) else []):
        if isinstance(node, dict):
            table.add_row(Text(name), f"{node.get('a', '-')}/{node.get('b', '-')}",
                          str(node.get("rank", "-")), str(node.get("codec", "-")),
                          _seconds(node.get("step_s")), _seconds(node.get("measured_step_s")),
                          _link(node.get("planned_link")), _link(node.get("link")))
    return table


def _link(link) -> str:
    """A link of the plan's JSON (free-form in the status document), or '-'."""
    try:
        return (f"{link['up_bytes_per_s'] / 1e6:.1f}/{link['down_bytes_per_s'] / 1e6:.1f}, "
                f"{link['rtt_s'] * 1e3:.0f} ms")
    except (TypeError, KeyError):
        return "-"


def workers_table(s: Status, now: float) -> Table | None:
    """Split-server workers (split.server per-site): when each was last heard, the sites'
    trunk copies it has sent that closed rounds, the sites it served in its last round."""
    if not s.workers:
        return None
    table = _table("split-server workers", "worker", "last seen", "copies", "last round's sites")
    for name, w in sorted(s.workers.items()):
        table.add_row(Text(name), _ago(w.last_seen, now), str(w.copies), ", ".join(w.sites) or "-")
    return table


def _seconds(x) -> str:
    """A figure of the plan's JSON (free-form in the status document), or '-'."""
    return format(x, ".3f") if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _blocks(blocks: list[int]) -> str:
    return ", ".join(map(str, blocks)) if len(blocks) <= 10 else f"{len(blocks)} blocks ({blocks[0]}..{blocks[-1]})"


def render(s: Status, now: float | None = None) -> Group:
    """Everything `fsl-edge status` shows for one snapshot."""
    parts: list[RenderableType] = [header(s), agents_table(s, now or time.time())]
    if s.traffic:
        parts.append(traffic_table(s))
    if s.history:
        parts.append(history_table(s))
        parts.append(contributions_table(s))
    for extra in (selection_table(s), planner_table(s), workers_table(s, now or time.time())):
        if extra is not None:
            parts.append(extra)
    rejected = {k: n for k, n in s.rejected.items() if n}
    if rejected:
        parts.append(Text("rejected: " + ", ".join(f"{k} {n}" for k, n in sorted(rejected.items())),
                          style="yellow"))
    return Group(*parts)


Fetch = Callable[[], tuple[Status, str]]


def _print_json(get: Fetch, watch: bool, interval: float) -> None:
    while True:
        # One document per line, so `--json --watch` is a stream that tools can read.
        print(get()[1].strip(), flush=True)
        if not watch:
            return
        time.sleep(interval)


def _watch(get: Fetch, where: str, interval: float, console: Console) -> None:
    last: RenderableType = Text(f"connecting to {where} ...")
    with Live(last, console=console, auto_refresh=False) as live:
        while True:
            try:
                last = render(get()[0])
                live.update(last, refresh=True)
            except TemporaryError as e:
                # Keep watching through a coordinator restart: show why, keep the last tables.
                live.update(Group(last, Text(f"{e} (retrying every {interval:g} s)", style="red")),
                            refresh=True)
            time.sleep(interval)


# Where an option's value came from, by precedence: the command line beats the environment.
_GIVEN = {"COMMANDLINE": 2, "ENVIRONMENT": 1}


def _through_cluster(ctx: typer.Context) -> bool:
    """Whether the kube options were given, and more directly than --url; both typed: an error."""
    def given(name: str) -> int:
        source = ctx.get_parameter_source(name)
        return _GIVEN.get(source.name, 0) if source else 0

    url, kube = given("url"), max(given(n) for n in ("context", "kubeconfig", "namespace"))
    if url == kube == _GIVEN["COMMANDLINE"]:
        raise ConfigError("--url and --context/--kubeconfig/--namespace are two ways to reach the "
                          "coordinator: pass one or the other")
    return kube > url


@contextlib.contextmanager
def _source(ctx: typer.Context, url: str | None, context: str | None, kubeconfig: Path | None,
            namespace: str | None) -> Iterator[tuple[Fetch, str]]:
    """How to get the status, and where from in words: --url, or the Service via the kubeconfig."""
    if not _through_cluster(ctx):
        yield functools.partial(fetch, url or DEFAULT_URL), url or DEFAULT_URL
        return
    namespace = namespace or DEFAULT_NAMESPACE
    with Cluster(context, kubeconfig, timeout_s=TIMEOUT_S) as cluster:
        yield (functools.partial(fetch_service, cluster, namespace),
               f"Service {COORDINATOR} in namespace {namespace} (context {cluster.context})")


def status(
    ctx: typer.Context,
    url: Annotated[Optional[str], typer.Option(
        envvar="FSL_STATUS_URL", show_default=DEFAULT_URL,
        help="Base URL of the coordinator's status API.")] = None,
    context: Context = None,
    kubeconfig: Kubeconfig = None,
    namespace: Annotated[Optional[str], typer.Option(
        envvar="FSL_NAMESPACE", show_default=DEFAULT_NAMESPACE,
        help="Namespace of the deployment; with --context or --kubeconfig, or alone, reach the "
             "coordinator's Service through the kubeconfig instead of --url.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the status document as JSON.")] = False,
) -> None:
    """Show a running coordinator's run, agents, traffic and rounds."""
    try:
        with _source(ctx, url, context, kubeconfig, namespace) as (get, where):
            if json_out:
                _print_json(get, watch, interval)
            elif watch:
                _watch(get, where, interval, Console())
            else:
                Console().print(render(get()[0]))
    except KeyboardInterrupt:
        if not watch:
            raise
        # Ctrl-C is how --watch is meant to end, not a failure.
