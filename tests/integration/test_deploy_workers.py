"""`fsl-edge deploy` with split-server workers, against the Kubernetes API emulator over real
HTTP: the worker Deployment, its autoscaler and their broker login and ACL appear with
`split_workers`, go again without it, and a per-site split without workers is refused."""

from __future__ import annotations

import pytest
import yaml

from fsl_edge.deploy import broker_auth, names, topics
from fsl_edge.deploy.kube import Cluster

from .kube_emulator import isolate_from_machine
from .test_deploy import NS, deploy_to, fsl_edge_deploy, one_error_line, secret

PER_SITE = "training:\n  split:\n    server: per-site\n"
WORKERS = PER_SITE + "split_workers:\n  replicas: 2\n  max_replicas: 5\n  target_cpu_percent: 60\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    isolate_from_machine(tmp_path, monkeypatch)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)


def config(tmp_path, text: str) -> str:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return str(path)


def worker_objects(kube) -> set[tuple[str, str]]:
    return {(plural, name) for plural, _, name in kube.objects() if name == names.WORKER
            and plural in ("deployments", "horizontalpodautoscalers")}


def test_workers_are_deployed_with_their_own_login_and_acl(kube, tmp_path, capsys):
    assert deploy_to(kube, "--config", config(tmp_path, WORKERS)) == 0
    err = capsys.readouterr().err
    assert worker_objects(kube) == {("deployments", names.WORKER),
                                    ("horizontalpodautoscalers", names.WORKER)}
    hpa = kube.objects()[("horizontalpodautoscalers", NS, names.WORKER)]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    assert "replicas" not in kube.objects()[("deployments", NS, names.WORKER)]["spec"]  # the HPA's

    login = secret(kube, names.WORKER_MQTT_SECRET)
    assert login["username"] == names.WORKER.encode() and len(login["password"]) >= 32
    auth = secret(kube, names.BROKER_AUTH_SECRET)
    hashed = broker_auth.passwd_users(auth["passwd"].decode())[names.WORKER]
    assert broker_auth.check_password(hashed, login["password"].decode())
    assert broker_auth.acl_blocks(auth["acl"].decode())[1] == {
        names.COORDINATOR: ["topic readwrite fsl/#"],
        names.WORKER: [f"topic {access} {topic}" for access, topic in topics.worker_topics()]}
    assert "deployment/fsl-worker" in err  # waited for: its rollout is shown


def test_redeploy_with_workers_changes_nothing(kube, tmp_path):
    assert deploy_to(kube, "--config", config(tmp_path, WORKERS)) == 0
    before = kube.objects()
    assert deploy_to(kube, "--config", config(tmp_path, WORKERS)) == 0
    assert kube.objects() == before


def test_turning_workers_off_removes_them_and_their_login(kube, tmp_path, capsys):
    assert deploy_to(kube, "--config", config(tmp_path, WORKERS)) == 0
    assert deploy_to(kube, "--config", config(tmp_path, "")) == 0
    assert "removed the split-server workers" in capsys.readouterr().err
    assert worker_objects(kube) == set()
    auth = secret(kube, names.BROKER_AUTH_SECRET)
    assert names.WORKER not in broker_auth.passwd_users(auth["passwd"].decode())
    assert list(broker_auth.acl_blocks(auth["acl"].decode())[1]) == [names.COORDINATOR]


def test_per_site_without_workers_is_refused_before_any_request(kube, tmp_path, capsys):
    assert deploy_to(kube, "--config", config(tmp_path, PER_SITE)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training.split.server is per-site" in line and "split_workers.replicas is 0" in line
    assert kube.request_count() == 0


def test_a_site_enrolled_as_the_workers_login_is_refused_before_any_write(kube, tmp_path, capsys):
    assert deploy_to(kube) == 0
    with Cluster(kubeconfig=kube.kubeconfig) as cluster:  # what `fsl-edge enroll fsl-worker` leaves
        cluster.write_secret(NS, names.NODE_KEYS_SECRET, {names.WORKER: b"key"}, names.LABELS)
    capsys.readouterr()
    before = kube.objects()
    assert deploy_to(kube, "--config", config(tmp_path, WORKERS)) == 2
    assert "a site is enrolled as 'fsl-worker'" in one_error_line(capsys.readouterr().err)
    assert kube.objects() == before


def test_dry_run_shows_the_workers_only_when_enabled(tmp_path, capsys):
    assert fsl_edge_deploy("--dry-run", "--namespace", NS, "--config", config(tmp_path, WORKERS)) == 0
    objects = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} >= {
        ("Deployment", names.WORKER), ("HorizontalPodAutoscaler", names.WORKER)}
    assert "Secret" not in {o["kind"] for o in objects}
    assert fsl_edge_deploy("--dry-run", "--namespace", NS) == 0
    objects = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    assert names.WORKER not in {o["metadata"]["name"] for o in objects}
