"""The report's figures as PNG bytes, drawn with matplotlib's object API (no pyplot, no display).

Each function returns None when the run does not record what it would draw. A site keeps its
colour in every figure, and so does a message kind.
"""

from __future__ import annotations

import io
import math

from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .run import Run

WIDTH, HEIGHT, DPI = 9.0, 3.6, 100  # 900 x 360 px: fits the page's column at full size


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # no Software tag: the file names no URL, so the page holds none either
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _figure(height: float = HEIGHT) -> tuple[Figure, object]:
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _colours(names: list[str]) -> dict[str, str]:
    palette = rcParams["axes.prop_cycle"].by_key()["color"]  # the default cycle, in order
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _legend(ax) -> None:
    # outside the axes, on the right: it never hides a line
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")


def train_loss(run: Run) -> bytes | None:
    """Training loss per round: each site's and the token-weighted mean."""
    rounds = [r for r in run.rounds if r.train_loss is not None or r.site_train_loss]
    last = {s.name: s for s in run.sites.values() if s.last_loss is not None}
    if not rounds and not last:
        return None
    fig, ax = _figure()
    colours = _colours(run.site_names)
    for name in run.site_names:
        points = [(r.round, r.site_train_loss[name]) for r in rounds if name in r.site_train_loss]
        if points:
            ax.plot(*zip(*points), marker="o", color=colours[name], label=name)
        elif name in last:  # a run from before per-site round records: its last round only
            ax.plot([last[name].last_round], [last[name].last_loss], marker="D", linestyle="",
                    color=colours[name], label=f"{name} (last round)")
    overall = [(r.round, r.train_loss) for r in rounds if r.train_loss is not None]
    if overall:
        ax.plot(*zip(*overall), color="black", linestyle="--", marker=".",
                label="all sites (token-weighted)")
    ax.set(xlabel="round", ylabel="training loss", title="Training loss per round")
    _legend(ax)
    return _png(fig)


def heldout_loss(run: Run) -> bytes | None:
    """Held-out loss from the base model (round 0) through the rounds, per site and overall."""
    h = run.heldout
    curves: dict[str, dict[int, float]] = {}
    for r in run.rounds:
        for name, loss in r.site_heldout_loss.items():
            curves.setdefault(name, {})[r.round] = loss
        if r.heldout_loss is not None:
            curves.setdefault("", {})[r.round] = r.heldout_loss
    if h is not None:
        end = run.rounds[-1].round if run.rounds else 1
        for name, before, after in [*((n, h.before.get(n), h.after.get(n)) for n in h.before),
                                    ("", h.overall_before, h.overall_after)]:
            curve = curves.setdefault(name, {})
            curve[0] = before
            curve.setdefault(end, after)
    curves = {k: v for k, v in curves.items() if any(x is not None for x in v.values())}
    if not curves:
        return None
    fig, ax = _figure()
    colours = _colours(run.site_names)
    every_round = True
    for name, curve in sorted(curves.items(), key=lambda kv: kv[0] == ""):
        xs, ys = zip(*sorted((x, y) for x, y in curve.items() if y is not None))
        # a line across rounds nobody measured would draw values that do not exist: dot it
        measured = list(xs) == list(range(xs[0], xs[-1] + 1))
        every_round &= measured
        style = dict(color="black", linestyle="--" if measured else ":",
                     label="all sites (token-weighted)") if name == "" else \
            dict(color=colours.get(name), linestyle="-" if measured else ":", label=name)
        ax.plot(xs, ys, marker="o", **style)
    ax.set(xlabel="round (0: the base model)", ylabel="held-out loss",
           title="Held-out loss with the global adapters" if every_round else
           "Held-out loss: the base model and the final adapters (rounds between not measured)")
    _legend(ax)
    return _png(fig)


def _kinds(run: Run) -> list[str]:
    """Message kinds, largest first."""
    totals: dict[str, int] = {}
    for r in run.rounds:
        for kind, flow in r.traffic.items():
            totals[kind] = totals.get(kind, 0) + flow.bytes
    return sorted((k for k, v in totals.items() if v), key=lambda k: -totals[k])


def _unit(nbytes: float) -> tuple[str, float]:
    for name, size in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return name, size
    return "bytes", 1


def traffic(run: Run) -> bytes | None:
    """Payload bytes per round, stacked by message kind."""
    kinds = _kinds(run)
    if not kinds:
        return None
    fig, ax = _figure()
    xs = [r.round for r in run.rounds]
    unit, size = _unit(max(sum(f.bytes for f in r.traffic.values()) for r in run.rounds))
    bottom = [0.0] * len(xs)
    colours = _colours(kinds)
    for kind in kinds:
        ys = [r.traffic[kind].bytes / size if kind in r.traffic else 0.0 for r in run.rounds]
        ax.bar(xs, ys, bottom=bottom, color=colours[kind], label=kind, width=0.6)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set(xlabel="round", ylabel=f"payload on the wire ({unit})",
           title="Traffic per round by message kind (both directions, every site)")
    ax.grid(True, axis="x", alpha=0)
    _legend(ax)
    return _png(fig)


def _overall_ratio(traffic) -> float | None:
    sent, raw = sum(f.bytes for f in traffic.values()), sum(f.raw or 0 for f in traffic.values())
    return raw / sent if sent and raw else None


def compression(run: Run) -> bytes | None:
    """Compression ratio (raw tensor bytes / payload bytes) per round, per kind and overall."""
    def points(kind: str) -> list[tuple[int, float]]:
        return [(r.round, r.traffic[kind].ratio) for r in run.rounds
                if kind in r.traffic and r.traffic[kind].ratio]

    kinds = [k for k in _kinds(run) if points(k)]
    if not kinds:
        return None
    fig, ax = _figure()
    colours = _colours(_kinds(run))
    for kind in kinds:
        ax.plot(*zip(*points(kind)), marker="o", color=colours[kind], label=kind)
    overall = [(r.round, _overall_ratio(r.traffic)) for r in run.rounds]
    ax.plot(*zip(*((x, y) for x, y in overall if y)), color="black", linestyle="--", marker=".",
            label="all messages")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="round", ylabel="raw bytes / bytes sent (x)", title="Compression ratio per round")
    _legend(ax)
    return _png(fig)


def _lookups(counts: dict) -> float:
    return counts.get("hits", 0) + counts.get("misses", 0)


def cache(run: Run) -> bytes | None:
    """The sites' prefix activation cache: hit rate per site (distributed) or per round."""
    sites = {n: s.cache for n, s in sorted(run.sites.items()) if _lookups(s.cache)}
    rounds = [r for r in run.rounds if _lookups(r.cache)]
    if not sites and not rounds:
        return None
    fig, ax = _figure()
    if sites:
        colours = _colours(run.site_names)
        rates = [100 * c["hits"] / _lookups(c) for c in sites.values()]
        bars = ax.bar(list(sites), rates, color=[colours[n] for n in sites], width=0.6)
        ax.bar_label(bars, [f"{rate:.0f} %  ({c['hits']:.0f} / {_lookups(c):.0f})"
                            for rate, c in zip(rates, sites.values())], fontsize="small")
        ax.set(xlabel="site", title="Activation cache hit rate per site, whole run "
                                    "(hits / lookups)")
        ax.grid(True, axis="x", alpha=0)
    else:
        rates = [100 * r.cache["hits"] / _lookups(r.cache) for r in rounds]
        ax.plot([r.round for r in rounds], rates, marker="o", color="black")
        ax.set(xlabel="round", title="Activation cache hit rate per round, every site")
    ax.set_ylim(0, 110)
    ax.set_ylabel("hit rate (%)")
    return _png(fig)


def party_layers(run: Run) -> tuple[dict[str, list[tuple[int, list[int]]]], str]:
    """Party -> (epoch or round, trainable blocks), and what the x axis counts."""
    parties = {"server": list(run.trunk_layers),
               **{n: list(s.layers) for n, s in sorted(run.sites.items())}}
    if any(parties.values()):
        return {k: v for k, v in parties.items() if v}, "epoch"
    by_round: dict[str, list[tuple[int, list[int]]]] = {}
    for r in run.rounds:
        for party, blocks in r.layers.items():
            by_round.setdefault(party, []).append((r.round, list(blocks)))
    return by_round, "round"


def layers(run: Run) -> bytes | None:
    """Which LoRA blocks each party trained, per epoch (or round): one small grid per party."""
    parties, axis = party_layers(run)
    if not parties:
        return None
    top = max((b for hist in parties.values() for _, blocks in hist for b in blocks), default=0)
    cols = min(len(parties), 4)
    rows = math.ceil(len(parties) / cols)
    fig = Figure(figsize=(WIDTH, 0.4 + rows * max(1.6, 0.32 * (top + 1))), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (party, hist) in zip(axes.flat, parties.items()):
        steps = [x for x, _ in hist]
        grid = [[1.0 if b in blocks else 0.0 for _, blocks in hist] for b in range(top + 1)]
        ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1.4, origin="lower",
                  extent=(-0.5, len(steps) - 0.5, -0.5, top + 0.5), interpolation="nearest")
        ax.set_xticks(range(len(steps)), [str(x) for x in steps])
        ax.set_yticks(range(top + 1))
        ax.tick_params(labelsize="small")
        ax.set_title(party, fontsize="medium")
        ax.set_xlabel(axis, fontsize="small")
        ax.set_ylabel("block", fontsize="small")
    for ax in list(axes.flat)[len(parties):]:
        ax.set_visible(False)
    fig.suptitle("Trainable LoRA blocks per party (green: trains)")
    return _png(fig)


FIGURES = {"train_loss": train_loss, "heldout_loss": heldout_loss, "traffic": traffic,
           "compression": compression, "cache": cache, "layers": layers}
