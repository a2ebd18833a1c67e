"""Node identities: enroll, revoke and list sites, and write the bundle a site runs."""

from .bundle import Site, enroll_site
from .nodes import Identity, NodeInfo, check_name, enroll, list_nodes, revoke
from .store import KubeStore, LocalStore, NodeStore, Registry, SecretClient

__all__ = ["Identity", "KubeStore", "LocalStore", "NodeInfo", "NodeStore", "Registry", "SecretClient",
           "Site", "check_name", "enroll", "enroll_site", "list_nodes", "revoke"]
