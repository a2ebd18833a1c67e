"""The names the cluster side shares with k8s/ and with `fsl-edge enroll`: one place to spell them.

k8s/ spells them too (YAML cannot import); tests/unit/test_k8s_manifests.py checks that the
rendered manifests use exactly these.
"""

from __future__ import annotations

FIELD_MANAGER = "fsl-edge"
"""Server-side apply's field manager for every object fsl-edge writes."""

DEFAULT_NAMESPACE = "fsl-edge"

COORDINATOR = "fsl-coordinator"
"""The coordinator's StatefulSet, Service and broker username."""
BROKER = "fsl-broker"
"""The broker's Deployment and Service."""
WORKER = "fsl-worker"
"""The split-server workers' Deployment and HorizontalPodAutoscaler, and the broker username
every worker replica shares (deployment config `split_workers`)."""
BROKER_PORT = 8883
"""MQTT over TLS, the broker's only listener."""
STATUS_PORT = 8780
"""The coordinator's status API inside its pod."""

BROKER_TLS_SECRET = "fsl-broker-tls"
"""kubernetes.io/tls: ca.crt (what sites trust), tls.crt and tls.key (the broker's)."""
BROKER_CA_SECRET = "fsl-broker-ca"
"""kubernetes.io/tls: the CA's own tls.crt and tls.key; created once, never regenerated."""
BROKER_AUTH_SECRET = "fsl-broker-auth"
"""Opaque: `passwd` (mosquitto password file) and `acl` (mosquitto ACL file)."""
PASSWD_KEY = "passwd"
ACL_KEY = "acl"
COORDINATOR_MQTT_SECRET = "fsl-coordinator-mqtt"
"""Opaque: `username` and `password` of the coordinator's broker identity; created once."""
NODE_KEYS_SECRET = "fsl-node-keys"
"""Opaque: one key per enrolled site, named after it; mounted into the coordinator."""
NODE_KEYS_DIR = "/etc/fsl-edge/node-keys"
"""Where the coordinator sees fsl-node-keys: one file per site (FSL_NODE_KEYS_DIR)."""
COORDINATOR_SIGNING_SECRET = "fsl-coordinator-signing"
"""Opaque: the coordinator's Ed25519 message-signing key, `private` (its FSL_COORDINATOR_SIGNING_KEY)
and `public` (what enroll writes into each site's agent.env); created once, never regenerated."""
SIGNING_PRIVATE_KEY = "private"
SIGNING_PUBLIC_KEY = "public"
COORDINATOR_CLIENT_TLS_SECRET = "fsl-coordinator-client-tls"
"""kubernetes.io/tls: the coordinator's client certificate from the broker CA, for mutual TLS
(deployment config `client_certificates`); issued by deploy, re-issued before it expires."""
WORKER_MQTT_SECRET = "fsl-worker-mqtt"
"""Opaque: `username` and `password` of the workers' broker identity; created once, while
workers are deployed."""
WORKER_CLIENT_TLS_SECRET = "fsl-worker-client-tls"
"""kubernetes.io/tls: the workers' client certificate from the broker CA (mutual TLS), as
COORDINATOR_CLIENT_TLS_SECRET is the coordinator's."""
CLIENT_TLS_DIR = "/etc/fsl-edge/client-tls"
"""Where the coordinator (and a worker, its own) sees that Secret (FSL_MQTT_CERT_FILE,
FSL_MQTT_KEY_FILE)."""
CA_FILE = "/etc/fsl-edge/tls/ca.crt"
"""Where the coordinator sees the broker's CA (FSL_MQTT_CA_FILE)."""

COORDINATOR_ACL_TOPICS = ("fsl/#",)
"""What the coordinator may read and write: every run's topics (with split-server workers, the
trunk it sends them and the worker-up topics it reads among them). The workers' and the sites'
topics are fsl_edge.deploy.topics'."""

LABELS = {"app.kubernetes.io/part-of": "fsl-edge", "app.kubernetes.io/managed-by": "fsl-edge"}
"""Labels on the Secrets fsl-edge creates; a Secret without them was brought by the user."""
