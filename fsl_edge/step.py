"""One split training step as explicit messages: the site's part and the server's part.

Each method consumes and produces the message objects of `messages.py`, so the in-process loop
(`split_step`) and the MQTT runtime run the same code; only the transport between them differs.

u-shape:  site.forward_front -> server.forward -> site.forward_back -> server.backward
          -> site.backward_front                  (4 hops; ids and labels stay at the site)
vanilla:  site.forward_front -> server.forward (loss + backward) -> site.backward_front
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Cut, LoraSettings, SplitMode
from .data import Batch
from .lora import adapter_state, attach, load_adapter_state
from .errors import ProtocolError
from .compression import StepCodec
from .messages import ActivationDown, ActivationUp, GradientDown, GradientUp, check_hidden
from .split import causal_lm_loss, discover, drop_blocks, embed, finish, positions, run_blocks


class _Party:
    """A peft-wrapped model copy with LoRA on the blocks this party runs, and its optimizer."""

    def __init__(self, model: nn.Module, cut: Cut, blocks: list[int], lora: LoraSettings,
                 lr: float, keep_all_blocks: bool = False):
        self.cut = cut
        self.device = next(model.parameters()).device  # messages arrive on the CPU
        self.model = attach(model, blocks, lora)
        self.parts = discover(self.model)
        if not keep_all_blocks:
            drop_blocks(self.parts, blocks)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=lr)

    def step(self) -> None:
        """Apply the accumulated LoRA gradients and clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, state)


class SitePart(_Party):
    """What an edge site runs: embeddings, blocks [0, a), and in u-shape [b, L), norm, head, loss."""

    def __init__(self, model: nn.Module, cut: Cut, lora: LoraSettings, lr: float, **kw):
        super().__init__(model, cut, cut.site_blocks, lora, lr, **kw)
        if lora.site_freeze_a:
            for name, p in self.model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self._pending: tuple[Batch, torch.Tensor] | None = None  # batch, front output (graph)

    def front(self, batch: Batch) -> ActivationUp:
        """Embeddings and front blocks; the returned hidden state keeps its autograd graph."""
        batch = batch.to(self.device)
        pos = positions(batch.attention_mask)
        h = embed(self.parts, batch.input_ids, pos)  # (B, T, C)
        h = run_blocks(self.parts, h, 0, self.cut.a, batch.attention_mask, pos)
        labels = batch.labels if self.cut.mode is SplitMode.VANILLA else None
        return ActivationUp(h, batch.attention_mask, pos, labels)

    def back_loss(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """u-shape: blocks [b, L), norm, head and the loss on the trunk's output."""
        batch = batch.to(self.device)
        pos = positions(batch.attention_mask)
        h = run_blocks(self.parts, hidden, self.cut.b, self.cut.n, batch.attention_mask, pos)
        return causal_lm_loss(finish(self.parts, h), batch.labels)

    def forward_front(self, batch: Batch) -> ActivationUp:
        """Training: run the front and return the message to send (detached)."""
        up = self.front(batch)
        self._pending = (batch, up.hidden)
        up.hidden = up.hidden.detach()
        return up

    def forward_back(self, down: ActivationDown) -> tuple[GradientUp, float]:
        """u-shape training: loss on the trunk's output, backward through the back blocks."""
        batch, front_out = self._require_pending()
        check_hidden("trunk output", down.hidden, tuple(front_out.shape))
        hidden = down.hidden.detach().to(self.device).requires_grad_(True)
        loss = self.back_loss(hidden, batch)
        loss.backward()
        return GradientUp(hidden.grad), loss.item()

    def backward_front(self, down: GradientDown) -> None:
        """Backpropagate the server's gradient at cut a through the front blocks."""
        _, front_out = self._require_pending()
        check_hidden("gradient at cut a", down.grad, tuple(front_out.shape))
        front_out.backward(down.grad.to(self.device))
        self._pending = None

    def _require_pending(self) -> tuple[Batch, torch.Tensor]:
        if self._pending is None:
            raise RuntimeError("no step in flight at this site: call forward_front first")
        return self._pending


class ServerPart(_Party):
    """What the split server runs: the trunk, blocks [a, b) (vanilla: [a, L) + head + loss).

    One trunk copy serves every site in turn (SplitFed-V2); the activations of each step in
    flight are kept under the caller's key until its gradient comes back.
    """

    def __init__(self, model: nn.Module, cut: Cut, lora: LoraSettings, lr: float, **kw):
        super().__init__(model, cut, cut.server_blocks, lora, lr, **kw)
        self._pending: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}

    def trunk(self, up: ActivationUp) -> torch.Tensor:
        """Blocks [a, b) on the site's activation; returns the trunk output (B, T, C)."""
        return run_blocks(self.parts, up.hidden, self.cut.a, self.cut.b, up.attention_mask,
                          up.position_ids)

    def trunk_loss(self, up: ActivationUp) -> torch.Tensor:
        """Vanilla: the trunk, then norm, head and the loss on the labels the site sent."""
        return causal_lm_loss(finish(self.parts, self.trunk(up)), up.labels)

    def forward(self, key: object, up: ActivationUp) -> ActivationDown | GradientDown:
        """Training: u-shape returns the trunk output; vanilla returns the gradient and loss."""
        up.validate(self.parts.hidden_size)
        on = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        up = ActivationUp(on(up.hidden).detach().requires_grad_(True), on(up.attention_mask),
                          on(up.position_ids), on(up.labels))
        if self.cut.mode is SplitMode.VANILLA:
            if up.labels is None:
                raise ProtocolError("vanilla mode needs the labels in the activation message")
            vocab = self.parts.embed.weight.shape[0]
            if ((up.labels < -100) | (up.labels >= vocab) | ((up.labels < 0) & (up.labels != -100))).any():
                raise ProtocolError(f"labels outside [0, {vocab}) and not -100")
            loss = self.trunk_loss(up)
            loss.backward()
            return GradientDown(up.hidden.grad, loss.item())
        out = self.trunk(up)
        self._pending[key] = (up.hidden, out)
        return ActivationDown(out.detach())

    def backward(self, key: object, grad: GradientUp) -> GradientDown:
        """u-shape: backpropagate the site's gradient at cut b through the trunk."""
        if key not in self._pending:
            raise ProtocolError(f"no step in flight for {key!r}")
        grad.validate(tuple(self._pending[key][1].shape))  # before the step is consumed
        hidden_in, out = self._pending.pop(key)
        out.backward(grad.grad.to(self.device))
        return GradientDown(hidden_in.grad)

    def drop_pending(self, key: object) -> None:
        """Forget a step whose site went away, so its graph is freed."""
        self._pending.pop(key, None)


@dataclass
class StepResult:
    loss: float
    tokens: int
    bytes: dict[str, int] = field(default_factory=dict)  # per message kind, as sent


def split_step(site: SitePart, server: ServerPart, batch: Batch, key: object = 0,
               codec: StepCodec | None = None) -> StepResult:
    """One training step across the cut, in process: the reference the runtime must equal.
    With a `codec`, every message is what its receiver decodes from the wire."""
    sent: dict[str, int] = {}

    def hop(message):
        if codec is None:
            sent[message.kind] = sent.get(message.kind, 0) + message.nbytes()
            return message
        message, n = codec.through(message)
        sent[message.kind] = sent.get(message.kind, 0) + n
        return message

    up = hop(site.forward_front(batch))
    if site.cut.mode is SplitMode.VANILLA:
        down = hop(server.forward(key, up))
        loss = down.loss
    else:
        grad_up, loss = site.forward_back(hop(server.forward(key, up)))
        down = hop(server.backward(key, hop(grad_up)))
    server.step()
    site.backward_front(down)
    site.step()
    return StepResult(loss, batch.tokens, sent)


@torch.no_grad()
def split_eval(site: SitePart, server: ServerPart, batch: Batch) -> tuple[float, int]:
    """Sum of token losses and token count on a batch, through the split, without training."""
    up = site.front(batch)
    if site.cut.mode is SplitMode.VANILLA:
        loss = server.trunk_loss(up)
    else:
        loss = site.back_loss(server.trunk(up), batch)
    tokens = batch.tokens
    return loss.item() * tokens, tokens
