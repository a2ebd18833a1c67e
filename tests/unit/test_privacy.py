"""What a site sends: in u-shape mode no token ids and no labels ever leave it.

Every message the server receives from a site is recorded by wrapping the server's two entry
points (`forward`, `backward`) while real split steps run; the test then inspects those objects.
"""

import copy

import pytest
import torch

from fsl_edge.config import LoraSettings, SplitMode, SplitSettings
from fsl_edge.data import Batch
from fsl_edge.messages import ActivationUp, GradientUp
from fsl_edge.split import discover, embed, positions
from fsl_edge.step import ServerPart, SitePart, split_step
from fsl_edge.tiny import tiny_model

LORA = LoraSettings(rank=4, alpha=8)
FAMILIES = ["llama", "gpt2"]
# The only integer tensors a site may send: they describe the padding, not the text.
INTEGER_FIELDS = {"attention_mask", "position_ids"}


def make_batch(seed: int, B: int = 3, T: int = 12) -> Batch:
    """Random ids, the same right padding for every seed, labels = ids with a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


class Recorder:
    """Wraps a ServerPart so that every message a site sends it is kept (by reference)."""

    def __init__(self, server: ServerPart, monkeypatch):
        self.received: list[ActivationUp | GradientUp] = []
        forward, backward = server.forward, server.backward

        def recording_forward(key, up, **kw):
            self.received.append(up)
            return forward(key, up, **kw)

        def recording_backward(key, grad):
            self.received.append(grad)
            return backward(key, grad)

        monkeypatch.setattr(server, "forward", recording_forward)
        monkeypatch.setattr(server, "backward", recording_backward)


def run_steps(family: str, mode: SplitMode, batches: list[Batch], monkeypatch):
    """Split steps on `batches`; returns the site and every message the server received."""
    base = tiny_model(family)
    cut = SplitSettings(mode=mode).cut(discover(base).n_blocks)
    site = SitePart(copy.deepcopy(base), cut, LORA, lr=1e-2)
    server = ServerPart(copy.deepcopy(base), cut, LORA, lr=1e-2)
    recorder = Recorder(server, monkeypatch)
    for b in batches:
        split_step(site, server, b)
    return site, recorder.received


def same_values(sent: torch.Tensor, secret: torch.Tensor) -> bool:
    return sent.shape == secret.shape and torch.equal(sent.to(secret.dtype), secret)


@pytest.mark.parametrize("family", FAMILIES)
def test_u_shape_site_sends_no_token_ids_and_no_labels(family, monkeypatch):
    batches = [make_batch(seed=1), make_batch(seed=2)]
    site, received = run_steps(family, SplitMode.U_SHAPE, batches, monkeypatch)

    # two steps, each: the activation at cut a, then the gradient at cut b
    assert [type(m) for m in received] == [ActivationUp, GradientUp] * 2
    for message, batch in zip(received, [b for b in batches for _ in range(2)]):
        if isinstance(message, ActivationUp):
            assert message.labels is None
        for name, t in message.tensors().items():
            if not t.is_floating_point():
                assert name in INTEGER_FIELDS, f"{type(message).__name__}.{name} is {t.dtype}"
            for secret_name, secret in (("input_ids", batch.input_ids), ("labels", batch.labels)):
                assert not same_values(t, secret), f"{name} equals the batch's {secret_name}"
                if t.is_floating_point() and t.dim() == 3:
                    # nor is any channel of the hidden state / gradient, at every position
                    same = t.round() == secret.to(t.dtype).unsqueeze(-1)  # (B, T, C)
                    channel_is_secret = same.all(0).all(0)  # (C,)
                    assert not channel_is_secret.any(), f"a channel of {name} is the {secret_name}"

    # The integer tensors are a function of the padding alone: two batches with the same
    # padding but different token ids and labels produce identical ones.
    first, second = received[0], received[2]
    assert not torch.equal(batches[0].input_ids, batches[1].input_ids)
    assert not torch.equal(batches[0].labels, batches[1].labels)
    for name in INTEGER_FIELDS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.hidden, second.hidden)  # the recording did see real data

    # What goes up has been through the site's front blocks: not the embeddings, which map
    # back to the token ids by a lookup in the (public) embedding table.
    with torch.no_grad():
        embedded = embed(site.parts, batches[0].input_ids, positions(batches[0].attention_mask))
    assert (first.hidden - embedded).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_mode_sends_the_labels(family, monkeypatch):
    """Documents the leak vanilla mode is opted into: the labels (= the text) go to the server."""
    batch = make_batch(seed=3)
    _, received = run_steps(family, SplitMode.VANILLA, [batch], monkeypatch)
    assert [type(m) for m in received] == [ActivationUp]
    up = received[0]
    assert up.labels is not None
    assert torch.equal(up.labels, batch.labels)
    # where the loss is computed, the labels are the input ids: the text itself is sent
    real = batch.labels != -100
    assert torch.equal(up.labels[real], batch.input_ids[real])
