"""The deployment config of `fsl-edge deploy`: a YAML file, `FSL_` environment overrides, checks.

Precedence, highest first: command-line options, environment (`FSL_NAMESPACE`,
`FSL_EXPOSE__HOST`: nested fields joined by a double underscore), the YAML file, the defaults.
"""

from __future__ import annotations

import re
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict, SettingsError

from fsl_edge.config import LearningSettings, RuntimeSettings, ServerCopies
from fsl_edge.config_file import read_mapping, settings_error
from fsl_edge.errors import ConfigError

from . import names

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
# RFC 1123 labels, as Kubernetes requires of namespace names
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _own_version() -> str:
    """The coordinator image's default tag: this fsl-edge's version, so both sides match."""
    try:
        return version("fsl-edge")
    except PackageNotFoundError:  # a source tree without an install
        return "latest"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Image(_Strict):
    """A container image: repository and tag."""

    name: str
    """Repository, with its registry, e.g. registry.example.org/fsl-edge-coordinator."""
    tag: str
    """Tag (or @sha256:... digest) of the image."""

    @field_validator("name", "tag")
    @classmethod
    def _no_blanks(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"must be non-empty without spaces, not {v!r}")
        return v


class Images(_Strict):
    """The images the pods run."""

    coordinator: Image = Image(name="fsl-edge-coordinator", tag=_own_version())
    """Built from docker/ (see README); push it where the cluster can pull it."""
    broker: Image = Image(name="eclipse-mosquitto", tag="2.0.21")
    """Mosquitto 2 (SIGHUP reloads credentials and certificates); also runs the reloader."""


class Storage(_Strict):
    """The coordinator's volume for checkpoints and downloaded models."""

    class_name: str | None = None
    """StorageClass of the volume; None takes the cluster's default class."""
    size: str = "20Gi"
    """Size as a Kubernetes quantity. Fixed once created: a StatefulSet's volume claims are
    immutable."""

    @field_validator("size")
    @classmethod
    def _quantity(cls, v: str) -> str:
        if not _QUANTITY.match(v):
            raise ValueError(f"must be a Kubernetes quantity such as 20Gi, not {v!r}")
        return v


class Exposure(str, Enum):
    """How sites outside the cluster reach the broker."""

    LOADBALANCER = "loadbalancer"
    """A cloud load balancer's address, port 8883."""
    NODEPORT = "nodeport"
    """Any node's address, on a port of 30000-32767."""
    NONE = "none"
    """A ClusterIP only: put an Ingress controller's TCP passthrough or another TCP proxy in
    front (TLS ends at the broker, so the proxy must not terminate it)."""


class Expose(_Strict):
    """How sites outside the cluster reach the broker."""

    mode: Exposure = Exposure.LOADBALANCER
    """loadbalancer, nodeport or none (see Exposure)."""
    host: str | None = None
    """The DNS name or IP address sites connect to. It goes into the broker's certificate, so
    set it whenever sites cannot use the load balancer's own address. None with a load
    balancer: its address, once the cloud assigns one."""
    node_port: int | None = Field(None, ge=30000, le=32767)
    """nodeport: the port on every node; None lets Kubernetes pick one."""

    @model_validator(mode="after")
    def _node_port_needs_nodeport(self) -> Expose:
        if self.node_port is not None and self.mode is not Exposure.NODEPORT:
            raise ValueError("expose.node_port needs expose.mode: nodeport")
        return self


class SplitWorkers(_Strict):
    """Split-server workers (`fsl-edge worker`): the pods that run the model's trunk for the
    sites when the training's `split.server` is per-site (SplitFed-V1). They take the sites'
    steps from an MQTT shared subscription, so any number of them serve, and a
    HorizontalPodAutoscaler adds workers, up to `max_replicas`, while their CPU is busy."""

    replicas: int = Field(0, ge=0)
    """Workers at least (the autoscaler's floor). 0: none are deployed, which is right for
    split.server shared (the coordinator serves the trunk itself), and only for it."""
    max_replicas: int | None = Field(None, ge=1)
    """The most workers the autoscaler runs; None: `replicas` (a fixed number)."""
    target_cpu_percent: int = Field(70, ge=1, le=1000)
    """The workers' mean CPU use, in percent of what each requests, that the autoscaler keeps
    them at (HPA averageUtilization). Each worker gets `gpus` GPUs like the coordinator, but
    the autoscaler still scales on CPU: scaling on GPU use needs a custom metric."""

    @model_validator(mode="after")
    def _bounds(self) -> SplitWorkers:
        if self.max_replicas is not None and not self.replicas:
            raise ValueError("split_workers.max_replicas needs split_workers.replicas >= 1")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"split_workers.max_replicas ({self.max_replicas}) is below "
                             f"split_workers.replicas ({self.replicas})")
        return self

    @property
    def ceiling(self) -> int:
        """The autoscaler's maxReplicas."""
        return self.max_replicas if self.max_replicas is not None else self.replicas


class DeploySettings(BaseSettings):
    """Where and what `fsl-edge deploy` deploys."""

    model_config = SettingsConfigDict(env_prefix="FSL_", env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    context: str | None = None
    """kubeconfig context of the cluster; None: the kubeconfig's current context."""
    kubeconfig: Path | None = None
    """kubeconfig file; None: $KUBECONFIG, else ~/.kube/config."""
    namespace: str = names.DEFAULT_NAMESPACE
    """Namespace of every object, created if absent."""
    images: Images = Field(default_factory=Images)
    gpus: int = Field(1, ge=0, le=16)
    """NVIDIA GPUs for the coordinator's trunk; 0 runs it on CPU cores."""
    storage: Storage = Field(default_factory=Storage)
    expose: Expose = Field(default_factory=Expose)
    """The broker's way out of the cluster. (Not `broker`: FSL_BROKER is the agent's URL.)"""
    client_certificates: bool = False
    """Mutual TLS: the broker admits only clients that also show a certificate from its CA
    (`fsl-edge enroll --client-cert` issues a site's; deploy issues the coordinator's). The
    password still names the node, so revoking it locks the node out with or without one."""
    model: str = "smollm2"
    """The base model, as `fsl-edge models` names it; every site must hold the same one."""
    training: LearningSettings = Field(default_factory=LearningSettings)
    """Split, LoRA and optimisation settings (the coordinator's `training`)."""
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    """Run id, timing and packet size (the coordinator's `runtime`); `broker` is set by deploy."""
    split_workers: SplitWorkers = Field(default_factory=SplitWorkers)
    """The split-server workers; needed exactly when `training.split.server` is per-site."""
    min_agents: int = Field(1, ge=1)
    """Sites that must have joined before the first round starts."""
    max_agents: int = Field(1000, ge=1)
    """Sites the coordinator's registry accepts."""
    quorum: int = Field(1, ge=1)
    """Sites that must be online for a later round to start."""
    rollout_timeout_s: float = Field(900.0, gt=0)
    """How long deploy waits for the pods to be ready (the first start pulls images and may
    download the model)."""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"must be a DNS label (lowercase letters, digits, '-'), not {v!r}")
        return v

    @field_validator("split_workers")
    @classmethod
    def _workers_serve_per_site(cls, v: SplitWorkers, info: ValidationInfo) -> SplitWorkers:
        training = info.data.get("training")
        if training is None:  # invalid itself: its own error says why
            return v
        per_site = training.split.server is ServerCopies.PER_SITE
        if per_site and not v.replicas:
            raise ValueError("training.split.server is per-site, which only split-server workers "
                             "serve, but split_workers.replicas is 0: set split_workers.replicas "
                             "to 1 or more, or training.split.server to shared")
        if v.replicas and not per_site:
            raise ValueError(f"split_workers.replicas is {v.replicas} but training.split.server "
                             "is shared, where the coordinator serves the trunk and workers would "
                             "idle: set training.split.server to per-site, or "
                             "split_workers.replicas to 0")
        return v

    @field_validator("runtime")
    @classmethod
    def _broker_is_deploys(cls, v: RuntimeSettings) -> RuntimeSettings:
        # The coordinator's broker is the one deployed next to it; a second source of truth for
        # its address could only disagree with the manifests.
        if "broker" in v.model_fields_set:
            raise ValueError("runtime.broker is set by deploy (the in-cluster broker): remove it")
        return v


def load_deploy_settings(path: Path | None, overrides: dict[str, Any] | None = None) -> DeploySettings:
    """Read `path` (optional), apply `FSL_` environment variables, then the non-None `overrides`."""
    file_data = read_mapping(path, "deployment config") if path is not None else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    class _FromFile(DeploySettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):
            return init_settings, env_settings, InitSettingsSource(settings_cls, file_data)

    try:
        loaded = _FromFile(**overrides)
    except ValidationError as e:
        raise settings_error(e, f" in {path}" if path else "") from e
    except SettingsError as e:  # an FSL_ variable that does not parse (a nested one is JSON)
        raise ConfigError(f"invalid deployment settings in the environment: {e}") from e
    return DeploySettings.model_construct(**dict(loaded))

