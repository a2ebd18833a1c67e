"""The report's sections, each a function of the `Run` returning HTML (fsl_edge.report.markup)."""

from __future__ import annotations

from fsl_edge.status import direction

from . import plots
from .markup import DASH, data, esc, figure, loss, nbytes, note, ratio, section, table
from .run import Run

SOURCES = {"coordinator": "a distributed run (a coordinator's checkpoint folder)",
           "simulate": "an in-process simulation (`fsl-edge simulate`)"}


def _settings_rows(s: dict) -> list[tuple[str, str]]:
    def get(*path, default=None):
        node = s
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return default if node is None else node

    split = (f"{get('split', 'mode', default=DASH)}, "
             f"front {get('split', 'front', default='default')}, "
             f"back {get('split', 'back', default='default')}")
    rows = [("split", split),
            ("LoRA rank", get("lora", "rank", default=DASH)),
            ("rounds x steps, batch", f"{get('train', 'rounds', default=DASH)} x "
                                      f"{get('train', 'steps', default=DASH)}, batch "
                                      f"{get('train', 'batch_size', default=DASH)}"),
            ("learning rate", get("train", "lr", default=DASH)),
            ("compression", get("compression", "preset", default=DASH)),
            ("frozen prefix (cached)", get("prefix", "frozen", default=DASH)),
            ("layer selection", get("selection", "policy", default=DASH)),
            ("aggregation screen", get("robust", "rule", default=DASH))]
    return [(k, str(v)) for k, v in rows]


def overview(run: Run) -> str:
    h, last = run.heldout, run.rounds[-1] if run.rounds else None
    total = sum(f.bytes for f in run.traffic.values())
    ledger = DASH if run.ledger is None else ("verified" if run.ledger.ok else "BROKEN")
    rows = [("run", run.name), ("source", SOURCES.get(run.kind, run.kind)),
            ("folder", str(run.folder)), ("model", run.model or DASH),
            ("mode", run.mode or DASH), ("state", run.state or DASH),
            ("rounds", f"{len(run.rounds)} of {run.rounds_planned or DASH}"),
            ("sites", ", ".join(run.site_names) or DASH),
            ("held-out loss, all sites", DASH if h is None else
             f"{loss(h.overall_before)} (base model) \u2192 {loss(h.overall_after)} (after)"),
            ("training loss, last round", loss(last.train_loss if last else None)),
            ("traffic on the wire", nbytes(total)),
            ("compression ratio", ratio(run.compression_ratio)),
            ("ledger", ledger)]
    parts = [table(["", ""], rows, numeric_from=2)]
    if run.settings:
        parts += ["<h3>Settings</h3>", table(["setting", "value"], _settings_rows(run.settings),
                                                   numeric_from=2)]
    return section("overview", "Overview", *parts)


def losses(run: Run) -> str:
    rows = [(r.round, ", ".join(r.participants), sum(r.tokens.values()), loss(r.train_loss),
             loss(r.heldout_loss), f"{r.seconds:.1f}") for r in run.rounds]
    parts = [figure(plots.train_loss(run), "training loss per round and per site"),
             figure(plots.heldout_loss(run), "held-out loss per round and per site"),
             table(["round", "participants", "tokens", "training loss", "held-out loss",
                    "seconds"], rows, numeric_from=2)]
    if run.kind == "coordinator":
        parts.append(note("A distributed run records each round's training loss per site and "
                          "token-weighted (runs before per-site records show each site's last "
                          "round only); the coordinator holds no site's data, so held-out loss "
                          "comes from heldout.json, which `fsl-edge up` writes after its run."))
    return section("losses", "Loss per round and per site", *parts)


def heldout(run: Run) -> str:
    h = run.heldout
    if h is None:
        return section("heldout", "Held-out loss before and after", note(
            "Not recorded in this folder: the coordinator holds no site's data. `fsl-edge up` "
            "writes heldout.json beside the checkpoints after its run; `fsl-edge simulate` "
            "evaluates every round."))

    def row(name, before, after):
        if None in (before, after) or not before:
            return (name, loss(before), loss(after), DASH)
        return (name, loss(before), loss(after), f"{100 * (after - before) / before:+.2f} %")

    rows = [row(n, h.before.get(n), h.after.get(n)) for n in sorted(set(h.before) | set(h.after))]
    rows.append(row("all sites (token-weighted)", h.overall_before, h.overall_after))
    samples = "every held-out sample" if h.samples is None else \
        f"the first {h.samples} held-out samples of each site"
    return section("heldout", "Held-out loss before and after",
                   table(["site", "base model", "after the federation", "change"], rows),
                   note(f"Evaluated on {samples}, with the federation's final adapters."))


def traffic(run: Run) -> str:
    rows = [(kind, direction(kind) or DASH, DASH if f.messages is None else f.messages,
             nbytes(f.bytes), nbytes(f.raw), ratio(f.ratio))
            for kind, f in sorted(run.traffic.items(), key=lambda kv: -kv[1].bytes)]
    sent = sum(f.bytes for f in run.traffic.values())
    raw = None if any(f.raw is None for f in run.traffic.values()) else \
        sum(f.raw or 0 for f in run.traffic.values())
    rows.append(("all", "", DASH if any(f.messages is None for f in run.traffic.values())
                 else sum(f.messages or 0 for f in run.traffic.values()), nbytes(sent), nbytes(raw),
                 ratio(run.compression_ratio)))
    return section("traffic", "Traffic by message kind",
                   figure(plots.traffic(run), "traffic per round by message kind"),
                   table(["kind", "direction", "messages", "on the wire", "raw tensors",
                          "compression"], rows, numeric_from=2),
                   note("Whole run, both directions, every site" + (
                       "; control messages (hello, heartbeat) carry no tensors."
                       if run.kind == "coordinator"
                       else "; a simulation counts what would cross the wire.")))


def compression(run: Run) -> str:
    png = plots.compression(run)
    if png is None:
        preset = (run.settings.get("compression") or {}).get("preset", DASH)
        return section("compression", "Compression ratio", note(
            f"Not recorded: this run counts the bytes it sent, not the raw tensor bytes "
            f"(compression preset: {preset})."))
    return section("compression", "Compression ratio",
                   figure(png, "compression ratio per round by message kind"),
                   note(f"Whole run: {ratio(run.compression_ratio)} "
                        "(raw tensor bytes / bytes sent)."))


def cache(run: Run) -> str:
    png = plots.cache(run)
    if png is None:
        return section("cache", "Activation cache", note(
            "No frozen prefix in this run, so no activation cache (`--frozen-prefix N`)."))
    parts = [figure(png, "activation cache hit rate")]
    sites = {n: s for n, s in run.sites.items() if s.cache}
    if sites:
        # invalidated: entries dropped because the prefix changed (a site block froze into it)
        keys = ("hits", "misses", "invalidated", "entries", "evictions", "corrupt")
        parts.append(table(["site", "computed by", *keys, "size", "hit rate"], [
            (n, s.prefix_backend or DASH, *(f"{s.cache.get(k, 0):.0f}" for k in keys),
             nbytes(s.cache.get("bytes")), f"{100 * s.cache.get('hit_rate', 0):.1f} %")
            for n, s in sorted(sites.items())], numeric_from=2))
    store = run.prefix_store
    if store.get("entries") or store.get("hits"):
        parts.append(note(f"Server prefix store (sample keys instead of activations): "
                          f"{store.get('entries', 0)} entries, {nbytes(store.get('bytes'))}, "
                          f"{store.get('hits', 0)} hits, {store.get('misses', 0)} misses."))
    return section("cache", "Activation cache", *parts)


def layers(run: Run) -> str:
    parties, axis = plots.party_layers(run)
    if not parties:
        return section("layers", "Layer selection", note(
            "Not recorded: every LoRA block trained (layer selection `all`)."))
    rows = [(party, hist[-1][0], ", ".join(map(str, hist[-1][1])) or "none")
            for party, hist in parties.items()]
    return section("layers", "Layer selection",
                   figure(plots.layers(run), "trainable LoRA blocks per party"),
                   table(["party", f"last {axis}", "trainable blocks"], rows, numeric_from=1))


def planner(run: Run) -> str:
    """The planner's choices, and who served the trunk (the split-server workers)."""
    workers = ("<h3>Split-server workers</h3>" + table(
        ["worker", "sites' trunk copies", "sites of its last round"],
        [(w, n, ", ".join(sites) or DASH) for w, (n, sites) in sorted(run.workers.items())],
        numeric_from=1)) if run.workers else ""
    if run.planner is None:
        return section("planner", "Planner", note("The planner was not used in this run."), workers)
    return section("planner", "Planner", "<p>What the planner chose, as the run recorded it:</p>",
                   data(run.planner), workers)


def ledger(run: Run) -> str:
    lg = run.ledger
    if lg is None:
        why = "an in-process simulation keeps none" if run.kind == "simulate" else \
            "no ledger.jsonl in this folder"
        parts = [note(f"No ledger: {why}.")]
    else:
        verdict = '<span class="ok">Chain verified</span>' if lg.ok else \
            '<span class="bad">Chain NOT verified</span>'
        pinned = "pinned" if lg.pinned else "from the genesis entry, not pinned"
        parts = [f"<p>{verdict}: {lg.entries} entries, {lg.rounds} rounds, signed by "
                 f"{esc(lg.key or DASH)} (key {esc(pinned)}); checkpoints matching it: "
                 f"{esc(', '.join(lg.checkpoints) or 'none')}.</p>"]
        if lg.problems:
            parts.append("<ul>" + "".join(f"<li>{esc(p)}</li>" for p in lg.problems) + "</ul>")
        total = sum(c.tokens for c in lg.contributions.values()) or 1
        parts.append("<h3>Contributions</h3>" + table(
            ["node", "rounds", "tokens", "share", "rejected updates"], [
            (node, c.rounds, c.tokens, f"{100 * c.tokens / total:.1f} %", c.rejected)
            for node, c in lg.contributions.items()]))
        parts.append("<h3>Rejected updates</h3>" + (table(
            ["round", "node", "why"], lg.rejections, numeric_from=3) if lg.rejections
            else note("None: every update was accepted.")))
    if run.rejected_messages:
        parts.append("<h3>Messages dropped on the wire</h3>" + table(
            ["reason", "messages"], sorted(run.rejected_messages.items())))
    elif run.kind == "coordinator":
        parts.append(note("No message was dropped on the wire."))
    return section("ledger", "Ledger", *parts)


SECTIONS = (overview, losses, heldout, traffic, compression, cache, layers, planner, ledger)
