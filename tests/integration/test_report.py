"""`fsl-edge report` of real runs: `fsl-edge up` (processes, Mosquitto, the ledger) and
`fsl-edge simulate` on the tiny model; the page opened in a real headless browser."""

import json
import shutil
import subprocess

import pytest
from PIL import Image

from fsl_edge.cli.app import main
from fsl_edge.icd10_data import build_icd10
from fsl_edge.status import Status

from ..unit.test_report import PNG, SECTIONS, assert_self_contained, images

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
SITES = ("circulatory", "neoplasms")
# 8 samples a site, batch 4: two steps an epoch, so the second round's are cache hits
RUN = ["--model", "tiny-random-llama", "--rounds", "2", "--steps", "2", "--batch-size", "4",
       "--max-len", "32", "--frozen-prefix", "1", "--layers", "topk-gradnorm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished `fsl-edge up` workdir and `fsl-edge simulate` folder of the same small run."""
    root = tmp_path_factory.mktemp("runs")
    build_icd10(root / "data", chapters=SITES, per_site=8, heldout=4)
    up, sim = root / "up", root / "sim"
    assert main(["up", *RUN, "--agents", "2", "--compression", "balanced", "--eval-samples", "4",
                 "--data", str(root / "data"), "--workdir", str(up)]) == 0
    assert main(["simulate", *RUN, "--data", str(root / "data"), "--out", str(sim)]) == 0
    return up, sim


def test_the_report_of_an_up_run_shows_its_figures(runs, tmp_path):
    up, _ = runs
    out = tmp_path / "report.html"
    assert main(["report", str(up / "checkpoints"), "--out", str(out)]) == 0
    html = out.read_text()
    status = Status.model_validate_json((up / "checkpoints" / "status.json").read_text())
    heldout = json.loads((up / "checkpoints" / "heldout.json").read_text())
    assert all(f'<section id="{s}">' in html for s in SECTIONS)
    assert f"{heldout['overall_after']:.4f}" in html and f"{heldout['overall_before']:.4f}" in html
    assert f"{status.history[-1].train_loss:.4f}" in html
    # the coordinator records every participant's loss in every round, and the token-weighted
    # mean is theirs
    for r in status.history:
        assert set(r.site_loss) == set(r.participants) == set(SITES)
        assert min(r.site_loss.values()) <= r.train_loss <= max(r.site_loss.values())
    assert all(site in html for site in SITES) and all(kind in html for kind in status.traffic)
    assert "Chain verified" in html and "round-000002" in html
    assert "The planner was not used in this run." in html
    pngs = images(html)
    assert len(pngs) == 6 and all(p.startswith(PNG) for p in pngs)
    assert_self_contained(html)


def test_the_report_of_a_simulation_shows_its_figures(runs, tmp_path):
    _, sim = runs
    out = tmp_path / "report.html"
    assert main(["report", str(sim), "--out", str(out)]) == 0
    html = out.read_text()
    metrics = json.loads((sim / "metrics.json").read_text())
    last = metrics["rounds"][-1]
    assert f"{last['heldout_loss_all']:.4f}" in html
    assert all(f"{loss:.4f}" in html for loss in last["heldout_loss"].values())
    assert all(site in html for site in SITES) and all(kind in html for kind in last["bytes"])
    assert all(p.startswith(PNG) for p in images(html)) and len(images(html)) == 5
    assert_self_contained(html)


def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:  # a skip would silently stop guarding the page: say how to get it
        pytest.fail("chromium is not installed: run scripts/setup.sh (or apt-get install chromium)",
                    pytrace=False)
    up, _ = runs
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert main(["report", str(up), "--out", str(page)]) == 0
    # no network for the browser: a page that needs any would render without it
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=127.0.0.1:9",
                    "--window-size=1280,4800", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=180)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4800)
    # the figures are on the page: matplotlib's first two colours (sites, kinds) fill many pixels
    colours = {c: n for n, c in image.getcolors(maxcolors=1 << 20)}
    assert colours.get((31, 119, 180), 0) > 2000 and colours.get((255, 127, 14), 0) > 2000, \
        sorted(colours.items(), key=lambda kv: -kv[1])[:8]
