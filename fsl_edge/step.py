"""One split training step as explicit messages: the site's part and the server's part.

Each method consumes and produces the message objects of `messages.py`, so the in-process loop
(`split_step`) and the MQTT runtime run the same code; only the transport between them differs.

u-shape:  site.forward_front -> server.forward -> site.forward_back -> server.backward
          -> site.backward_front                  (4 hops; ids and labels stay at the site)
vanilla:  site.forward_front -> server.forward (loss + backward) -> site.backward_front
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .compression import StepCodec
from .config import Cut, LearningSettings, LoraSettings, PrefixSettings, SelectionSettings, SplitMode
from .data import Batch
from .errors import ProtocolError
from .lora import adapter_state, attach, load_adapter_state
from .messages import ActivationDown, ActivationUp, GradientDown, GradientUp, check_hidden
from .prefix import MissingKeys, PrefixStore, SitePrefix
from .selection import LayerSelector
from .split import causal_lm_loss, discover, drop_blocks, embed, finish, positions, run_blocks


class _Party:
    """A peft-wrapped model copy with LoRA on the blocks this party trains, its optimizer and
    its layer selection."""

    def __init__(self, model: nn.Module, cut: Cut, blocks: list[int], lora: LoraSettings,
                 lr: float, keep_all_blocks: bool = False, run_blocks_: list[int] | None = None,
                 selection: SelectionSettings | None = None, seed: int = 0,
                 selectable_front: list[int] | None = None):
        """`blocks`: the blocks with LoRA; `run_blocks_`: the blocks this party runs (default
        the same); `selectable_front`: the blocks freeze-front may freeze, in order."""
        self.cut = cut
        self.device = next(model.parameters()).device  # messages arrive on the CPU
        if blocks:
            self.model = attach(model, blocks, lora)
        else:  # a site whose every block is frozen (vanilla, prefix.frozen = a) trains nothing
            self.model = model.requires_grad_(False)
        self.parts = discover(self.model)
        if not keep_all_blocks:
            drop_blocks(self.parts, run_blocks_ or blocks)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr) if trainable else NoOptimizer()
        self.selector = LayerSelector(self.model, self.parts.blocks_name, blocks,
                                      selection or SelectionSettings(), seed, selectable_front)

    def step(self) -> None:
        """Apply the accumulated LoRA gradients and clear them."""
        self.selector.observe()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def at_epoch(self, epoch: int) -> None:
        self.selector.at_epoch(epoch, self.optimizer)

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model) if self.selector.blocks else {}

    def load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        if self.selector.blocks or state:
            load_adapter_state(self.model, state)


class NoOptimizer:
    """The optimizer of a party with nothing to train: state, steps and checkpoints are empty."""

    state: dict = {}

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, state: dict) -> None:
        pass


class SitePart(_Party):
    """What an edge site runs: embeddings, blocks [0, a), and in u-shape [b, L), norm, head, loss.

    With a frozen prefix (`prefix.frozen` blocks without LoRA, plus any front blocks a selection
    policy froze), the prefix is computed per sample through `SitePrefix` (and its cache)."""

    def __init__(self, model: nn.Module, cut: Cut, lora: LoraSettings, lr: float,
                 prefix: PrefixSettings | None = None, selection: SelectionSettings | None = None,
                 seed: int = 0, cache=None, **kw):
        self.prefix_settings = prefix or PrefixSettings()
        frozen = self.prefix_settings.frozen
        lora_blocks = [b for b in cut.site_blocks if b >= frozen]
        super().__init__(model, cut, lora_blocks, lora, lr, run_blocks_=cut.site_blocks,
                         selection=selection, seed=seed,
                         selectable_front=[b for b in range(frozen, cut.a)], **kw)
        if lora.site_freeze_a and lora_blocks:
            for name, p in self.model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad], lr=lr)
            # the fixed A is never the selector's to unfreeze
            self.selector.params = {b: [p for p in ps if p.requires_grad]
                                    for b, ps in self.selector.params.items()}
        self.prefix = SitePrefix(self.parts, self.prefix_settings.backend, cache, static=frozen)
        self.data_digest = ""  # of the site's examples: names what its keys point to
        self.server_has: set[int] = set()  # send_keys: the keys whose activations the server holds
        self._wire_prefix: str | None = None
        self._pending: tuple[Batch, torch.Tensor] | None = None  # batch, front output (graph)
        self._last_up: ActivationUp | None = None  # for a resend with the activations
        self._fingerprint: str | None = None  # of the prefix behind the last front output
        self.front_seconds = 0.0  # time spent in the front's forward while training

    @property
    def frozen_front(self) -> int:
        """Blocks from the front that nothing trains: the prefix computed per sample and cached."""
        return self.prefix_settings.frozen + self.selector.frozen_front()

    @property
    def front_trains(self) -> bool:
        """Whether anything below cut a trains (else no gradient needs to come back)."""
        return self.frozen_front < self.cut.a

    def front(self, batch: Batch) -> ActivationUp:
        """Embeddings and front blocks; the returned hidden state keeps its autograd graph."""
        batch = batch.to(self.device)
        pos = positions(batch.attention_mask)
        frozen = self.frozen_front
        self._fingerprint = None
        if frozen:
            # training batches (they have sample ids) go through the cache; evaluation does not
            h, self._fingerprint = self.prefix.batch(batch, frozen, cached=bool(batch.ids))
        else:
            h = embed(self.parts, batch.input_ids, pos)  # (B, T, C)
        h = run_blocks(self.parts, h, frozen, self.cut.a, batch.attention_mask, pos)
        labels = batch.labels if self.cut.mode is SplitMode.VANILLA else None
        return ActivationUp(h, batch.attention_mask, pos, labels, need_grad=self.front_trains,
                            epoch=batch.epoch, a=self.cut.a, b=self.cut.b)

    def _with_keys(self, up: ActivationUp, batch: Batch, fingerprint: str) -> None:
        wire = hashlib.sha256(f"{fingerprint}:{self.data_digest}".encode()).hexdigest()[:32]
        if wire != self._wire_prefix:
            self._wire_prefix, self.server_has = wire, set()
        up.keys, up.prefix = torch.tensor(batch.ids, dtype=torch.int64), wire
        if set(batch.ids) <= self.server_has:
            up.hidden = None  # the server holds every one: the keys stand for the activations
        else:
            self.server_has |= set(batch.ids)

    def back_loss(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """u-shape: blocks [b, L), norm, head and the loss on the trunk's output."""
        batch = batch.to(self.device)
        pos = positions(batch.attention_mask)
        h = run_blocks(self.parts, hidden, self.cut.b, self.cut.n, batch.attention_mask, pos)
        return causal_lm_loss(finish(self.parts, h), batch.labels)

    def forward_front(self, batch: Batch) -> ActivationUp:
        """Training: run the front and return the message to send (detached)."""
        self.at_epoch(batch.epoch)
        started = time.perf_counter()
        up = self.front(batch)
        self.front_seconds += time.perf_counter() - started
        self._pending = (batch, up.hidden)
        up.hidden = up.hidden.detach()
        if self._fingerprint and self.frozen_front == self.cut.a and self.prefix_settings.send_keys:
            self._with_keys(up, batch, self._fingerprint)
        self._last_up = dataclasses.replace(up, hidden=self._pending[1].detach())
        return up

    def resend_activations(self) -> ActivationUp:
        """The server lost the copies the keys stood for: the same message with the activations."""
        if self._last_up is None:
            raise RuntimeError("no step in flight at this site: call forward_front first")
        self.server_has = set(self._last_up.keys.tolist()) if self._last_up.keys is not None else set()
        return dataclasses.replace(self._last_up)

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
        if front_out.requires_grad:
            if down.grad is None:
                raise ProtocolError("the server sent no gradient at cut a, and the front trains")
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
    flight are kept under the caller's key until its gradient comes back. Sites may have
    different cuts (`cuts`, default: `cut` alone): the copy holds LoRA on the union of their
    trunks and runs, for each request, the [a, b) its message names.
    """

    def __init__(self, model: nn.Module, cut: Cut, lora: LoraSettings, lr: float,
                 prefix: PrefixSettings | None = None, selection: SelectionSettings | None = None,
                 seed: int = 0, cuts: Iterable[tuple[int, int]] | None = None, **kw):
        self.cuts = frozenset(cuts or [(cut.a, cut.b)])
        for a, b in self.cuts:
            Cut(mode=cut.mode, a=a, b=b, n=cut.n).check()
        blocks = sorted({i for a, b in self.cuts for i in range(a, b)})
        super().__init__(model, cut, blocks, lora, lr, selection=selection, seed=seed, **kw)
        self.store = PrefixStore((prefix or PrefixSettings()).server_max_bytes)
        self.site_epochs: dict[str, int] = {}  # the last epoch each site said it is in
        self._pending: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}

    def cut_of(self, up: ActivationUp) -> tuple[int, int]:
        """The (a, b) a request names (none: the server's own), or ProtocolError if not served."""
        if (up.a is None) != (up.b is None):
            raise ProtocolError(f"an activation names the cut a={up.a}, b={up.b}: give both or neither")
        ab = (self.cut.a, self.cut.b) if up.a is None else (up.a, up.b)
        if ab not in self.cuts:
            raise ProtocolError(f"cut {ab} is not served by this split server: it serves "
                                f"{', '.join(map(str, sorted(self.cuts)))}")
        return ab

    def trunk(self, up: ActivationUp) -> torch.Tensor:
        """Blocks [a, b) of the site's cut on its activation; returns the trunk output (B, T, C)."""
        a, b = self.cut_of(up)
        return run_blocks(self.parts, up.hidden, a, b, up.attention_mask, up.position_ids)

    def trunk_loss(self, up: ActivationUp) -> torch.Tensor:
        """Vanilla: the trunk, then norm, head and the loss on the labels the site sent."""
        return causal_lm_loss(finish(self.parts, self.trunk(up)), up.labels)

    def forward(self, key: object, up: ActivationUp, site: str = "") -> ActivationDown | GradientDown:
        """Training: u-shape returns the trunk output; vanilla returns the gradient and loss.
        `site` names the sender: its keys index its own copies. MissingKeys when keys stand for
        copies this server no longer holds."""
        up.validate(self.parts.hidden_size)
        a, b = self.cut_of(up)  # before anything is stored for a request this server cannot run
        # the trunk re-selects its layers when the first site starts a new epoch; a site can
        # move on by one epoch at a time (it may go back: a replayed round rewinds it)
        ceiling = max(self.site_epochs.get(site, 0), self.selector.epoch) + 1
        if not 0 <= up.epoch <= ceiling:
            raise ProtocolError(f"epoch {up.epoch} from {site or 'a site'} is outside 0..{ceiling}")
        self.site_epochs[site] = up.epoch
        self.at_epoch(up.epoch)
        hidden = up.hidden
        if up.keys is not None:
            keys = up.keys.tolist()
            if hidden is None:
                hidden = self.store.get(site, up.prefix, keys, up.attention_mask)
            else:
                self.store.put(site, up.prefix, keys, hidden, up.attention_mask)
        on = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        up = ActivationUp(on(hidden).detach().requires_grad_(up.need_grad), on(up.attention_mask),
                          on(up.position_ids), on(up.labels), a=a, b=b)
        if self.cut.mode is SplitMode.VANILLA:
            if up.labels is None:
                raise ProtocolError("vanilla mode needs the labels in the activation message")
            vocab = self.parts.embed.weight.shape[0]
            if ((up.labels < -100) | (up.labels >= vocab) | ((up.labels < 0) & (up.labels != -100))).any():
                raise ProtocolError(f"labels outside [0, {vocab}) and not -100")
            loss = self.trunk_loss(up)
            loss.backward()
            return GradientDown(up.hidden.grad if up.hidden.requires_grad else None, loss.item())
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
        return GradientDown(hidden_in.grad if hidden_in.requires_grad else None)

    def drop_pending(self, key: object) -> None:
        """Forget a step whose site went away, so its graph is freed."""
        self._pending.pop(key, None)


def party_options(settings: LearningSettings) -> dict:
    """What a SitePart or ServerPart takes from the run's settings besides the LoRA and lr."""
    return {"prefix": settings.prefix, "selection": settings.selection, "seed": settings.train.seed}


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
    try:
        out = server.forward(key, up, site=str(key))
    except MissingKeys:
        out = server.forward(key, hop(site.resend_activations()), site=str(key))
    if site.cut.mode is SplitMode.VANILLA:
        down = hop(out)
        loss = down.loss
    else:
        grad_up, loss = site.forward_back(hop(out))
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
