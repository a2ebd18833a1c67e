"""Read a run folder into a `Run`: a coordinator's checkpoint folder or a simulation's output.

- `fsl-edge up` (and any coordinator) leaves `status.json` (fsl_edge.status.Status), the ledger
  and `round-NNNNNN/` checkpoints in its checkpoint folder; `up` adds `heldout.json`. A folder
  whose coordinator has not exited yet (or was killed) has no status.json: the newest
  checkpoint's `state.json` holds the rounds so far. `up`'s workdir (runs/up) stands for its
  `checkpoints/`.
- `fsl-edge simulate --out DIR` writes `metrics.json` (fsl_edge.runs): per-round losses per
  site, held-out loss from round 0 (the base model), bytes per message kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fsl_edge.errors import ConfigError
from fsl_edge.ledger_format import LEDGER, RejectedEntry, RoundEntry
from fsl_edge.status import RoundRecord, Status, Traffic

from .heldout import HELDOUT, Heldout
from .run import Flow, LedgerSummary, Round, Run, Site

STATUS, METRICS, LATEST = "status.json", "metrics.json", "LATEST"


def load_run(folder: Path, public_key: Path | None = None) -> Run:
    """The run in `folder`; ConfigError naming what is missing when it is not a run folder.
    `public_key`: the coordinator's ledger.pub, kept apart, to pin when verifying the ledger."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: give the checkpoint folder of a run "
                          "(runs/up/checkpoints) or the --out folder of `fsl-edge simulate`")
    if not _is_coordinator(folder) and _is_coordinator(folder / "checkpoints"):
        folder = folder / "checkpoints"
    if _is_coordinator(folder):
        return _from_coordinator(folder, public_key)
    if (folder / METRICS).is_file():
        return _from_simulation(folder)
    raise ConfigError(f"{folder} is not a run folder: it holds neither {STATUS} or {LATEST} (the "
                      f"checkpoint folder a coordinator or `fsl-edge up` writes, e.g. "
                      f"runs/up/checkpoints) nor {METRICS} (what `fsl-edge simulate --out` writes)")


def _is_coordinator(folder: Path) -> bool:
    return (folder / STATUS).is_file() or (folder / LATEST).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read: {e}") from e


# --- a coordinator's checkpoint folder --------------------------------------------------------
def _from_coordinator(folder: Path, public_key: Path | None) -> Run:
    raw, state = _status_document(folder)
    try:
        status = Status.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{folder / STATUS} is not a coordinator's status: "
                          f"{e.errors()[0]['msg']}") from e
    run = Run("coordinator", folder, status.run, status.model, status.mode, status.state,
              status.rounds, [_round(r) for r in status.history],
              traffic=_flows(status.traffic), rejected_messages=dict(status.rejected),
              trunk_layers=list(status.layers), prefix_store=dict(status.prefix_store),
              planner=raw.get("planner", state.get("planner")),
              workers={w: (s.copies, list(s.sites)) for w, s in status.workers.items()})
    run.sites = {name: Site(name, a.state, a.tokens, a.loss, None if a.loss is None else a.round,
                            dict(a.cache), list(a.layers), a.prefix_backend)
                 for name, a in status.agents.items()}
    if (folder / HELDOUT).is_file():
        try:
            run.heldout = Heldout.model_validate(_read_json(folder / HELDOUT))
        except ValidationError as e:
            raise ConfigError(f"{folder / HELDOUT} is malformed: {e.errors()[0]['msg']}") from e
    run.settings = (state.get("fingerprint") or {}).get("training") or {}
    if (folder / LEDGER).is_file():
        _ledger(run, public_key)
    return run


def _status_document(folder: Path) -> tuple[dict, dict]:
    """status.json, or one rebuilt from the newest checkpoint; and that checkpoint's state."""
    state: dict = {}
    if (folder / LATEST).is_file():
        latest = folder / (folder / LATEST).read_text().strip() / "state.json"
        state = _read_json(latest) if latest.is_file() else {}
    if (folder / STATUS).is_file():
        return _read_json(folder / STATUS), state
    genesis, fingerprint = _first_line(folder / LEDGER), state.get("fingerprint") or {}
    train = (fingerprint.get("training") or {}).get("train") or {}
    return {"run": genesis.get("run", folder.name), "state": "unfinished (no status.json)",
            "model": fingerprint.get("model", ""), "rounds": train.get("rounds", 0),
            "round": state.get("round", 0), "history": state.get("history", []),
            "agents": state.get("registry", {})}, state


def _first_line(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return {}


def _flows(traffic: dict[str, Traffic]) -> dict[str, Flow]:
    return {kind: Flow(t.bytes, t.raw_bytes, t.messages) for kind, t in traffic.items()}


def _round(r: RoundRecord) -> Round:
    return Round(r.round, list(r.participants), r.train_loss, r.heldout_loss,
                 site_train_loss=dict(r.site_loss), tokens={"all": r.tokens}, seconds=r.seconds,
                 traffic=_flows(r.traffic))


def _ledger(run: Run, public_key: Path | None) -> None:
    """Verify the ledger (and the checkpoints against it); take each site's tokens per round
    from it: the status keeps only a round's total."""
    from fsl_edge.audit import verify
    from fsl_edge.ledger import effective_rounds

    report = verify(run.folder / LEDGER, run.folder, public_key)
    rejections = []
    for e in report.entries:
        if isinstance(e, RoundEntry):
            rejections += [(e.round, r.agent, r.reason) for r in e.rejected]
        elif isinstance(e, RejectedEntry):
            rejections.append((e.round, e.agent, e.reason))
    run.ledger = LedgerSummary(report.ok, len(report.entries), report.rounds, report.key,
                               report.pinned, report.checkpoints, [str(p) for p in report.problems],
                               report.contributions(), rejections)
    entries = effective_rounds(report.entries)
    for r in run.rounds:
        if r.round in entries:
            r.tokens = dict(entries[r.round].tokens)


# --- a simulation's output --------------------------------------------------------------------
def _from_simulation(folder: Path) -> Run:
    doc = _read_json(folder / METRICS)
    if not isinstance(doc, dict) or not isinstance(doc.get("rounds"), list) or not doc["rounds"]:
        raise ConfigError(f"{folder / METRICS} holds no rounds: not the metrics of "
                          "`fsl-edge simulate`")
    settings = doc.get("settings") or {}
    try:
        rounds = [_sim_round(r) for r in doc["rounds"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{folder / METRICS} is malformed: {e!r}") from e
    before, done = (rounds[0], rounds[1:]) if rounds[0].round == 0 else (None, rounds)
    run = Run("simulate", folder, folder.name, doc.get("model", ""),
              (settings.get("split") or {}).get("mode", ""), "finished",
              (settings.get("train") or {}).get("rounds", len(done)), done,
              settings=settings, planner=doc.get("planner"))
    for r in done:
        for kind, flow in r.traffic.items():
            run.traffic.setdefault(kind, Flow()).bytes += flow.bytes
    last = done[-1] if done else None
    if before is not None and last is not None and before.site_heldout_loss:
        run.heldout = Heldout(before=before.site_heldout_loss, after=last.site_heldout_loss,
                              overall_before=before.heldout_loss, overall_after=last.heldout_loss)
    for name in doc.get("sites") or sorted({p for r in done for p in r.participants}):
        mine = [r for r in done if name in r.site_train_loss]
        run.sites[name] = Site(name, tokens=sum(r.tokens.get(name, 0) for r in done),
                               last_loss=mine[-1].site_train_loss[name] if mine else None,
                               last_round=mine[-1].round if mine else None)
    return run


def _sim_round(r: dict) -> Round:
    losses, tokens = r.get("train_loss") or {}, r.get("tokens") or {}
    total = sum(tokens.values())
    train = sum(losses[s] * tokens.get(s, 0) for s in losses) / total if total else None
    return Round(int(r["round"]), sorted(losses), train, r.get("heldout_loss_all"), dict(losses),
                 dict(r.get("heldout_loss") or {}), dict(tokens), float(r.get("seconds", 0.0)),
                 {k: Flow(int(v)) for k, v in (r.get("bytes") or {}).items()},
                 dict(r.get("cache") or {}), dict(r.get("layers") or {}))
