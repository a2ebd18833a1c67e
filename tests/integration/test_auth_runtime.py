"""Message authentication in a real run: a rogue client on the broker sends the coordinator
unsigned, forged, replayed, tampered, unknown-node, revoked-node and wrong-run messages, and the
agents unsigned and forged orders to stop. Each is dropped and counted under its reason, and the
run completes with exactly the simulation's result: none of it reached the training."""

import dataclasses
import time

import pytest

from fsl_edge import auth, protocol
from fsl_edge.auth import Signer
from fsl_edge.protocol import Envelope, MessageKind, decode_envelope, encode_envelope

from .bad_inputs import first_activation, forgeries
from .brokers import mqtt_client
from .runtime_harness import assert_matches_simulation, federation, finish, in_round, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_forged_replayed_tampered_and_unsigned_messages_are_counted_and_the_run_goes_on(
        tmp_path, mosquitto_server):
    # long enough to still be training after the forgeries and a 7 s wait (a step takes ms)
    fed = federation(tmp_path, mosquitto_server.url, rounds=2, steps=400)
    run = fed.settings.runtime.run_id
    # mallory is enrolled (the coordinator holds its key) but runs no agent; revoked mid-run
    mallory_key = auth.new_node_key()
    fed.keys = dataclasses.replace(fed.keys, node_keys={**fed.keys.node_keys, "mallory": mallory_key})
    mallory = Signer("mallory", auth.node_key(mallory_key))
    captured: list[tuple[str, bytes]] = []

    def activation_up():
        return first_activation(captured)

    try:
        with mqtt_client(mosquitto_server, "eve", subscribe=[protocol.topic_all_up(run)],
                         on_message=lambda c, u, msg: captured.append((msg.topic, bytes(msg.payload)))) as eve:
            def send(topic: str, data: bytes) -> None:
                eve.publish(topic, data, qos=1).wait_for_publish(5)

            fed.start()
            wait_for(in_round(fed, 1, 3), 180, "round 1 under way", fed)
            topic, genuine, env = wait_for(activation_up, 30, "a captured activation")
            heard = list(captured)
            agent, seq = env.sender, env.seq + 10**9
            up = protocol.topic_up(run, "mallory")

            def heartbeat(run_id: str = run, sender: str = agent) -> Envelope:
                return Envelope(MessageKind.HEARTBEAT, run_id, sender, seq=seq)

            # (a)-(e): unsigned, a MAC under a key not the agent's, the capture replayed, the
            # capture with one byte flipped, a node never enrolled signing with a key of its own
            for bad in forgeries(topic, genuine, seq):
                send(bad.topic, bad.payload)
            # (f) an enrolled node, signing an envelope of another run on this run's topic
            send(up, encode_envelope(heartbeat("other-run", "mallory"), mallory, up))
            # (g) mallory while enrolled (authentic, but no agent of the run: unknown_agent), then
            # revoked as `fsl-edge revoke --local` would, and the coordinator re-reads its keys
            send(up, encode_envelope(heartbeat(sender="mallory"), mallory, up))

            def refused_mallory():  # before the revocation, or they would count as unknown_node
                s = fed.status()
                return s is not None and s.rejected.get(auth.WRONG_RUN, 0) >= 1 and \
                    s.rejected.get("unknown_agent", 0) >= 1
            wait_for(refused_mallory, 20, "the coordinator to refuse mallory's messages", fed)
            revoked = dataclasses.replace(fed.keys, node_keys={
                k: v for k, v in fed.keys.node_keys.items() if k != "mallory"})
            revoked.coordinator_env(fed.workdir / "keys")
            # orders to every agent to stop: unsigned, then signed with a key not the coordinator's
            stop = Envelope(MessageKind.ROUND_END, run, auth.COORDINATOR, seq=seq, meta={"finished": True})
            broadcast = protocol.topic_broadcast(run)
            send(broadcast, encode_envelope(stop))
            impostor = Signer(auth.COORDINATOR, auth.signing_key(auth.new_signing_key()))
            send(broadcast, encode_envelope(stop, impostor, broadcast))
            time.sleep(7)  # the coordinator re-reads its node keys every 5 s
            assert fed.status().state == "training", "the run must still be going"
            mallory_late = heartbeat(sender="mallory")
            mallory_late.seq += 1
            send(up, encode_envelope(mallory_late, mallory, up))
        status = finish(fed)
    finally:
        fed.stop()
    # the run is authenticated: every genuine message was signed by its agent
    assert heard and all(decode_envelope(p).sender == t.split("/")[3] for t, p in heard)
    auth_reasons = {r: status.rejected.get(r, 0) for r in
                    (auth.UNSIGNED, auth.FORGED, auth.REPLAYED, auth.UNKNOWN_NODE, auth.WRONG_RUN)}
    assert auth_reasons == {"unsigned": 1, "forged": 2, "replayed": 1, "unknown_node": 2, "wrong_run": 1}, \
        status.rejected
    assert status.rejected.get("unknown_agent", 0) >= 1  # mallory authentic: past auth, then refused
    assert "mallory" not in status.agents and "intruder" not in status.agents
    assert all(r.participants == sorted(fed.sites) for r in status.history)
    # logged once per reason and sender: (b) and (d) are both forged and from the same agent
    log = (fed.workdir / "logs" / "coordinator.log").read_text()
    assert log.count(f"dropped a message (forged) on {topic} from '{agent}'") == 1, log
    for name in fed.sites:  # the agents refused the orders to stop, and said why
        agent_log = (fed.workdir / "logs" / f"agent-{name}.log").read_text()
        assert f"dropped a message (unsigned) on {broadcast}" in agent_log, agent_log
        assert f"dropped a message (forged) on {broadcast}" in agent_log, agent_log
    assert_matches_simulation(fed)
