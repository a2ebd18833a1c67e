"""The cluster side of fsl-edge: render k8s/ with a deployment config and apply it.

`deploy()` is what `fsl-edge deploy` runs; `kube.Cluster` is the Kubernetes client other
commands share (`fsl-edge enroll` reads and writes the broker's Secrets through it);
`names` holds the Secret names, keys and mount paths that k8s/ and enroll agree on.
"""

from __future__ import annotations

from .apply import DeployResult, deploy
from .settings import DeploySettings, load_deploy_settings

__all__ = ["DeployResult", "DeploySettings", "deploy", "load_deploy_settings"]
