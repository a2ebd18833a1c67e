"""`fsl-edge report` on run folders written here with the producers' own models: a coordinator's
checkpoint folder (status, ledger, checkpoints) and a simulation's metrics.json."""

import base64
import json
import re
import stat
from dataclasses import asdict
from types import SimpleNamespace

import torch

from fsl_edge.cli.app import main
from fsl_edge.coordinator import checkpoint
from fsl_edge.ledger import LEDGER, Ledger
from fsl_edge.report import render_report
from fsl_edge.report.heldout import Heldout, save_heldout
from fsl_edge.simulation import RoundMetrics
from fsl_edge.status import AgentStatus, RoundRecord, Status, Traffic

SITES = ("site-a", "site-b")
KINDS = ("activation_up", "gradient_down", "adapter_up", "heartbeat")
PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("overview", "losses", "heldout", "traffic", "compression", "cache", "layers",
            "planner", "ledger")


def traffic(n: int) -> dict[str, Traffic]:
    return {"activation_up": Traffic(messages=4 * n, bytes=1000 * n, raw_bytes=4000 * n),
            "gradient_down": Traffic(messages=4 * n, bytes=1500 * n, raw_bytes=4000 * n),
            "adapter_up": Traffic(messages=2, bytes=600, raw_bytes=800),
            "heartbeat": Traffic(messages=3, bytes=90)}


def coordinator_folder(tmp_path, sites=SITES, run="run-7", **extra):
    """What a coordinator leaves in its checkpoint folder at exit: status.json (plus `extra`)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir(parents=True)
    agents = {name: AgentStatus(state="online", round=2, loss=2.5 + i / 8, tokens=300,
                                rounds_contributed=2, layers=[(0, [0, 3]), (1, [3])],
                                cache={"hits": 6, "misses": 10, "entries": 10, "bytes": 4096,
                                       "hit_rate": 0.375}, prefix_backend="torch")
              for i, name in enumerate(sites)}
    history = [RoundRecord(round=r, participants=sorted(sites), train_loss=3.0 - r / 4,
                           tokens=300, seconds=1.5, traffic=traffic(r)) for r in (1, 2)]
    status = Status(run=run, state="finished", round=2, rounds=2, model="tiny-random-llama",
                    mode="u-shape", agents=agents, history=history, traffic=traffic(3),
                    layers=[(0, [1, 2]), (1, [2])], rejected={"bad_shape": 2})
    (folder / "status.json").write_text(json.dumps({**json.loads(status.model_dump_json()), **extra}))
    return folder


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def assert_self_contained(html: str) -> None:
    assert not re.search(r"https?://", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', html))


def test_a_coordinators_folder_gives_every_section_with_the_runs_figures(tmp_path):
    folder = coordinator_folder(tmp_path)
    save_heldout(folder, Heldout(before={"site-a": 3.25, "site-b": 3.5},
                                 after={"site-a": 2.875, "site-b": 3.0625},
                                 overall_before=3.375, overall_after=2.96875, samples=8))
    html = render_report(folder)
    assert all(f'<section id="{s}">' in html for s in SECTIONS)
    assert all(name in html for name in SITES) and all(kind in html for kind in KINDS)
    assert "2.9688" in html and "3.3750" in html  # held-out loss, all sites: after and before
    assert "2.5000" in html  # the last round's training loss
    assert "bad_shape" in html and "The planner was not used in this run." in html
    assert "37.5 %" in html  # site-a's cache hit rate
    pngs = images(html)
    assert len(pngs) == 6 and all(p.startswith(PNG) for p in pngs)  # loss x2, traffic, ratio, cache, layers
    assert_self_contained(html)


def test_every_string_from_the_run_is_escaped(tmp_path):
    evil = '<script>alert("x")</script>'
    folder = coordinator_folder(tmp_path, sites=(evil, "b&b"), run='run "7" <i>',
                                planner={"nodes": {evil: {"codec": "<b>lossless</b>"}}})
    html = render_report(folder)
    assert "<script" not in html and "<b>" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "b&amp;b" in html


def test_a_planner_in_the_status_is_shown_as_a_table(tmp_path):
    plan = {"mode": "u-shape", "makespan_s": 3.25, "bottleneck": "server",
            "nodes": {"site-a": {"a": 2, "b": 5, "rank": 8, "codec": "lossless", "step_s": 0.5},
                      "site-b": {"a": 1, "b": 5, "rank": 4, "codec": "balanced", "step_s": 0.25}}}
    html = render_report(coordinator_folder(tmp_path, planner=plan))
    planner = html[html.index('<section id="planner">'):html.index('<section id="ledger">')]
    assert "not used" not in planner
    assert "<th>rank</th>" in planner and "<th>codec</th>" in planner
    assert re.search(r"<td>site-b</td>.*balanced", planner) and "bottleneck" in planner


def test_split_server_workers_are_shown_with_the_sites_they_served(tmp_path):
    workers = {"w0": {"last_seen": 1.0, "copies": 4, "sites": ["site-a"]},
               "w1": {"last_seen": 1.0, "copies": 2, "sites": []}}
    html = render_report(coordinator_folder(tmp_path, workers=workers))
    planner = html[html.index('<section id="planner">'):html.index('<section id="ledger">')]
    assert "Split-server workers" in planner and "not used" in planner
    assert re.search(r"<td>w0</td>.*4.*site-a", planner)
    plain = render_report(coordinator_folder(tmp_path / "plain"))
    assert "Split-server workers" not in plain


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.lora_A.weight": torch.randn(2, 4, generator=g)}


def test_the_ledger_summary_names_rejected_updates_and_a_broken_chain(tmp_path):
    folder = coordinator_folder(tmp_path)
    ledger = Ledger.open(folder / LEDGER, None, "run-7", {"model": "m"})
    for r in (1, 2):
        ledger.append_round(r, {"site-a": (100 * r, adapter(r)), "site-b": (50, adapter(10 + r))},
                            adapter(20 + r), adapter(30 + r),
                            rejected=[("site-c", "rejected: norm 40x the round's median")] if r == 2 else [])
    html = render_report(folder)
    assert "Chain verified" in html and "NOT verified" not in html
    assert "rejected: norm 40x the round&#x27;s median" in html and "site-c" in html
    assert re.search(r"<td>site-a</td><td class=\"n\">2</td><td class=\"n\">300</td>", html)

    lines = (folder / LEDGER).read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"site-a":200', b'"site-a":900')  # round 2's tokens, edited
    (folder / LEDGER).write_bytes(b"\n".join(lines))
    html = render_report(folder)
    assert "Chain NOT verified" in html and "entry 2" in html


def test_a_simulations_folder_shows_held_out_loss_per_round_and_site(tmp_path):
    def metrics(r: int) -> RoundMetrics:
        return RoundMetrics(r, {s: 3.0 - r / 4 for s in SITES} if r else {},
                            {s: 3.5 - r / 4 + i / 16 for i, s in enumerate(SITES)}, 3.5 - r / 4,
                            {s: 100 for s in SITES} if r else {},
                            {"activation_up": 1000 * r, "adapter_down": 300 * r} if r else {},
                            1.0, cache={"hits": 4 * r, "misses": 4}, layers={"server": [2], "site-a": [0]})

    (tmp_path / "metrics.json").write_text(json.dumps({
        "model": "tiny-random-llama", "sites": list(SITES),
        "settings": {"split": {"mode": "vanilla"}, "train": {"rounds": 3}},
        "rounds": [asdict(metrics(r)) for r in range(4)]}))
    html = render_report(tmp_path)
    assert "3.5000 (base model) \u2192 2.7500 (after)" in html
    assert "2.8125" in html  # site-b after three rounds
    assert "in-process simulation" in html and "No ledger" in html and "vanilla" in html
    assert "adapter_down" in html and len(images(html)) == 5  # no compression ratio recorded
    assert_self_contained(html)


def test_a_run_still_going_is_read_from_its_newest_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    trunk = SimpleNamespace(adapter=lambda: adapter(1),
                            optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    record = RoundRecord(round=1, participants=["site-a"], train_loss=2.25, tokens=64,
                         traffic=traffic(1))
    checkpoint.save(folder, 1, adapter(2), trunk, {
        "fingerprint": {"model": "m", "training": {"compression": {"preset": "balanced"}}},
        "history": [record.model_dump()], "registry": {"site-a": {"tokens": 64, "loss": 2.25}}})
    html = render_report(folder)
    assert "unfinished (no status.json)" in html and "2.2500" in html and "balanced" in html


def test_the_command_writes_the_page_and_refuses_what_is_not_a_run(tmp_path, capsys):
    folder = coordinator_folder(tmp_path)
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0  # the workdir: its checkpoints/
    assert out.read_text().startswith("<!DOCTYPE html>") and str(folder) in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    capsys.readouterr()

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (folder / "status.json").write_text("{not json")
    assert main(["report", str(folder)]) == 2
    assert "status.json cannot be read" in capsys.readouterr().err
