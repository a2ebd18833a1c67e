"""`fsl-edge coordinator`: load the model, connect, serve the status API, lead the run."""

from __future__ import annotations

import logging

from fsl_edge import protocol
from fsl_edge.auth import coordinator_authenticator
from fsl_edge.atomic import write_atomic
from fsl_edge.config import ServerCopies
from fsl_edge.models import load
from fsl_edge.status import Status
from fsl_edge.transport import BrokerLogin, MqttLink

from .coordinator import ME, Coordinator
from .settings import CoordinatorSettings
from .status_http import StatusServer

log = logging.getLogger("fsl_edge.coordinator")


def run_coordinator(settings: CoordinatorSettings, stop=lambda: False,
                    on_ready=lambda url: None) -> Status:
    """Run until the last round is aggregated; returns the final status."""
    rt = settings.runtime
    status_topic = protocol.topic_status(rt.run_id, ME)
    # signs what it sends, checks what agents send: on whenever node keys are configured
    authenticator = coordinator_authenticator(ME, settings.require_auth)
    if authenticator is None:
        log.warning("no node keys configured (FSL_NODE_KEYS_DIR): messages are neither signed "
                    "nor checked")
    link = MqttLink(rt.broker, f"fsl-{rt.run_id}-{ME}",
                    [protocol.topic_all_up(rt.run_id), protocol.topic_all_status(rt.run_id)]
                    + ([protocol.topic_all_worker_up(rt.run_id)]
                       if settings.training.split.server is ServerCopies.PER_SITE else []),
                    will=(status_topic, protocol.STATUS_OFFLINE),
                    online=(status_topic, protocol.STATUS_ONLINE), max_packet=rt.max_packet,
                    bounds=rt.bounds, login=BrokerLogin.from_env(), authenticator=authenticator)
    coordinator = None
    server = StatusServer(lambda: coordinator.published if coordinator else Status(run=rt.run_id),
                          lambda: coordinator is not None and link.connected.is_set(),
                          settings.status_host, settings.status_port).start()
    try:
        model = load(settings.model, device=settings.device,
                     quantize=settings.training.lora.quantize).model
        link.start()
        coordinator = Coordinator(settings, model, link)
        log.info("coordinator of run %s ready; status at %s", rt.run_id, server.url)
        on_ready(server.url)
        status = coordinator.run(stop)
        # the status API goes away with the process: leave the last document beside the checkpoints
        write_atomic(settings.checkpoint_dir / "status.json", status.model_dump_json(indent=1))
        return status
    finally:
        link.stop()
        server.stop()
