"""A split-server worker's state machine and the coordinator's side of the workers, without a
broker: what each answers, what waits, what is given up, what the status shows."""

import copy

import torch
from rich.console import Console

from fsl_edge import protocol
from fsl_edge.cli.status import render, workers_table
from fsl_edge.compression import StepCodec
from fsl_edge.config import LearningSettings, LoraSettings, ServerCopies, SplitSettings, TrainSettings
from fsl_edge.coordinator.workers import TrunkWorkers
from fsl_edge.data import BatchStream, Sample, tokenize
from fsl_edge.protocol import Envelope, MessageKind
from fsl_edge.split import discover
from fsl_edge.split_worker.worker import Worker
from fsl_edge.status import Status
from fsl_edge.step import ServerPart, SitePart, party_options
from fsl_edge.tiny import tiny_model, tiny_tokenizer
from fsl_edge.wire import Address, step_envelope, step_message

S = LearningSettings(split=SplitSettings(server=ServerCopies.PER_SITE), lora=LoraSettings(rank=4),
                     train=TrainSettings(steps=2, batch_size=2, max_len=16))


def parts(n_sites=2):
    model = tiny_model("llama")
    cut = S.split.cut(discover(model).n_blocks)
    server = ServerPart(copy.deepcopy(model), cut, S.lora, S.train.lr, **party_options(S))
    sites = [SitePart(copy.deepcopy(model), cut, S.lora, S.train.lr, **party_options(S))
             for _ in range(n_sites)]
    examples = tokenize([Sample("", f"note {i}") for i in range(4)], tiny_tokenizer(), 16)
    return server, sites, BatchStream(examples, 2, 0, 0)


def activation(site, batch, name, step, attempt="x-1"):
    env = step_envelope(site.forward_front(batch), Address("r", name, 1, step))
    env.meta["attempt"] = attempt
    return env


def test_a_worker_waits_for_the_trunk_serves_others_while_a_gradient_is_due_and_gives_it_up():
    server, (a, b), stream = parts()
    coordinator = TrunkWorkers("r")
    topic, trunk = coordinator.begin(1, "x-1", steps=2, trunk=server.adapter())
    assert topic == protocol.topic_trunk("r")
    worker = Worker(server, "r", "w0", StepCodec(S.compression.pipelines()), give_up_s=60.0)
    # before the trunk: the request waits and the worker asks for the trunk
    out = worker.on_request("ana", activation(a, next(stream), "ana", 0))
    assert [(t, e.kind) for t, e in out] == [(protocol.topic_worker_up("r", "w0"), MessageKind.HELLO)]
    out = worker.on_trunk(protocol.decode_envelope(protocol.encode_envelope(trunk)))
    assert [(t, e.kind, e.meta["worker"]) for t, e in out] == \
        [(protocol.topic_down("r", "ana"), MessageKind.ACTIVATION_DOWN, "w0")]
    # ana's gradient is due; bo is served meanwhile (its own copy, its own graph)
    ana_down = step_message(out[0][1], 1 << 30)
    bo_batch = next(stream)
    out = worker.on_request("bo", activation(b, bo_batch, "bo", 0))
    assert [(t, e.kind) for t, e in out] == [(protocol.topic_down("r", "bo"), MessageKind.ACTIVATION_DOWN)]
    # a resent request gets the same answer, applied once
    assert worker.on_request("bo", activation(b, bo_batch, "bo", 0))[0][1] is out[0][1]
    # ana's gradient comes: its step completes on its copy
    grad, _ = a.forward_back(ana_down)
    env = step_envelope(grad, Address("r", "ana", 1, 0))
    env.meta["attempt"] = "x-1"
    out = worker.on_request("ana", env)
    assert [(t, e.kind) for t, e in out] == [(protocol.topic_down("r", "ana"), MessageKind.GRADIENT_DOWN)]
    assert worker.steps_done["ana"] == 1 and "bo" in worker.pending
    # bo's gradient never comes: given up after give_up_s, its graph freed, its copy dropped
    worker.give_up_s = 0.0
    worker.tick()
    assert not worker.pending and "bo" not in worker.copies.copies and server._pending == {}


def test_the_coordinator_answers_a_workers_hello_takes_copies_of_members_only_and_averages():
    server, _, _ = parts(0)
    base = server.adapter()
    tw = TrunkWorkers("r")
    assert tw.on_message("w0", Envelope(MessageKind.HELLO, "r", "w0"), set()) == []  # no round
    _, trunk = tw.begin(3, "x-2", steps=2, trunk=base)
    assert tw.on_message("w1", Envelope(MessageKind.HELLO, "r", "w1"), set()) == \
        [(protocol.topic_trunk("r"), trunk)]
    # a worker that says it holds this attempt's trunk is not sent it again
    assert tw.on_message("w1", Envelope(MessageKind.HELLO, "r", "w1", meta={"attempt": "x-2"}),
                         set()) == []
    from fsl_edge.wire import adapter_envelope

    def copy_of(site, scale, attempt="x-2"):
        state = {k: v * scale for k, v in base.items()}
        env = adapter_envelope(MessageKind.ADAPTER_UP, state, Address("r", site, 3), {"attempt": attempt})
        return protocol.decode_envelope(protocol.encode_envelope(env))

    tw.on_message("w0", copy_of("ana", 1.0), {"ana", "bo"})
    tw.on_message("w0", copy_of("bo", 3.0, attempt="x-1"), {"ana", "bo"})  # an older attempt
    tw.on_message("w1", copy_of("eve", 5.0), {"ana", "bo"})  # not in the round
    assert tw.missing({"ana", "bo"}) == {"bo"}
    tw.on_message("w1", copy_of("bo", 3.0), {"ana", "bo"})
    avg = tw.close({"ana": 1, "bo": 3})
    k = next(iter(base))
    assert torch.allclose(avg[k], base[k] * 2.5)
    assert (tw.workers["w0"].copies, tw.workers["w0"].sites) == (1, ["ana"])
    assert (tw.workers["w1"].copies, tw.workers["w1"].sites) == (1, ["bo"])
    s = Status(run="r", workers=tw.workers)
    console = Console(width=120, record=True)
    console.print(render(s, now=tw.workers["w0"].last_seen))
    shown = console.export_text()
    assert "split-server workers" in shown and "w1" in shown and "bo" in shown
    assert workers_table(Status(run="r"), 0.0) is None
    # a round whose every update was rejected keeps its trunk
    tw.begin(4, "x-3", steps=2, trunk=base)
    assert tw.close({}) is base


def test_the_share_group_comes_from_the_environment_and_is_checked():
    from fsl_edge.errors import ConfigError
    from fsl_edge.split_worker.main import share_group

    assert share_group({}) == protocol.SHARE_GROUP
    assert share_group({"FSL_SHARE_GROUP": "a1b2"}) == "a1b2"
    assert protocol.topic_shared_steps("r", "a1b2") == "$share/a1b2/fsl/r/agent/+/step"
    import pytest
    with pytest.raises(ConfigError, match="FSL_SHARE_GROUP"):
        share_group({"FSL_SHARE_GROUP": "a/b"})
