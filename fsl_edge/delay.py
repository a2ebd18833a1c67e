"""The delay and memory model the planner minimises: what one node's step and round cost.

For node i with cut (a, b), site LoRA rank r and step codec k, over a round of S steps of
B x T tokens (u-shape: the site runs [0, a) and [b, L) plus the head; vanilla: [0, a) only)::

    site_s   = (B*T / ref) * (site blocks * block_s * (1 + r * lora_unit / block_params)
                              + head_s if u-shape)                       on the node's profile
    server_s = the same for blocks [a, b) at the trunk's rank (+ head_s in vanilla), on the server's
    hop      = msg / bw_up (or bw_down) + rtt / 2 + raw / codec_speed
               msg = raw / ratio_k, raw = B*T*C*bytes/elem
    wire_s   = up hops + down hops                  (u-shape 2 up + 2 down; vanilla 1 + 1)
    step_s   = site_s + wire_s + server_s
    hold_s   = server_s, + in u-shape the site's back blocks and head + one down and one up hop
    sync_s   = adapter * (1 / bw_up + 1 / bw_down) + rtt
               adapter = site blocks * r * lora_unit * 4 bytes / the codec's adapter ratio
    round_s  = S * step_s + sync_s                  (sync amortised: S * (step_s + sync_s / S))
    busy_s   = S * hold_s                           what node i costs the shared server
    memory   = frozen weights of the site's blocks + embeddings (+ head in u-shape)
               + 16 bytes per LoRA parameter (AdamW) + activations kept for the backward

The shared trunk (SplitFed-V2, coordinator/split_server.py) serves one node's step at a time,
in a fixed order, step-major: in u-shape it runs the trunk forward, then waits for that node's
gradient of the trunk's output before it serves anyone else, so a node's turn holds the trunk for
the trunk's compute AND its own back blocks, head and the two hops in between (hold_s), not for
the trunk's compute alone. With every node's turn once per step, a round takes
max(slowest S * step_s, S * sum of hold_s) in the steady state (`makespan`); `scheduled_s`
replays the order itself, ramp-up and drain included.

What a cut really trades: the hidden size is the same at every cut, so in u-shape moving (a, b)
changes compute (site vs server), memory and the adapter bytes, never the step messages. What
changes the step messages is the codec (ratio vs its encode+decode time), the hop count (mode:
run-wide, since vanilla sends the labels) and the tokens per step (run-wide). Left out: masks,
positions and labels (integers that zstd shrinks to little), the server's own link (in the
cluster, next to the broker), a frozen prefix or send_keys (they drop hops from some steps),
and attention's T^2 term (profile at the run's batch and sequence length to make it exact).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from .config import SplitMode
from .planner_settings import CodecOption  # noqa: F401 - its home before the settings moved
from .profile import NodeProfile

ADAM_BYTES = 16  # per LoRA parameter: fp32 weight, gradient and AdamW's two moments


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Frozen):
    """The sizes of the run's model that the delay and memory model need."""

    n_blocks: int
    hidden: int
    intermediate: int
    vocab: int
    block_params: int
    """Frozen parameters of one block."""
    embed_params: int
    """Input embeddings (and absolute position embeddings)."""
    head_params: int
    """The output head; 0 when it is tied to the input embeddings."""
    lora_unit: int
    """Sum of d_in + d_out over one block's LoRA target modules: LoRA params = rank * lora_unit."""
    weight_bytes: int = 4
    """Bytes per frozen weight (4 fp32, 2 bf16)."""
    act_bytes: int = 4
    """Bytes per activation element, in memory and uncompressed on the wire."""

    @property
    def act_elems_per_token(self) -> int:
        """Activations one block keeps for its backward, per token: an estimate for a Llama-style
        block (norm in/out, q/k/v, attention out, residuals: ~10 C; gate, up, act, down in: 4 I)."""
        return 10 * self.hidden + 4 * self.intermediate

    @classmethod
    def from_model(cls, model: torch.nn.Module, targets: tuple[str, ...] | None = None) -> ModelSpec:
        """Read the sizes from a causal LM as loaded (before LoRA is attached); `targets` as
        LoraSettings.target_modules."""
        from .lora import default_targets
        from .split import discover

        parts = discover(model)
        targets = tuple(targets or default_targets(model))
        block = parts.blocks[0]
        # peft's suffix match: a target names a module or the tail of its dotted name
        unit = sum(sum(m.weight.shape) for name, m in block.named_modules()
                   if hasattr(m, "weight") and m.weight.dim() == 2
                   and any(name == t or name.endswith("." + t) for t in targets))
        if unit == 0:
            raise ValueError(f"no module of block 0 matches the LoRA targets {targets}")
        cfg = parts.config.get_text_config()
        hidden = parts.hidden_size
        embed = parts.embed.weight.numel() + (parts.pos_embed.weight.numel() if parts.pos_embed else 0)
        tied = parts.head.weight.data_ptr() == parts.embed.weight.data_ptr()
        weight = next(block.parameters())
        return cls(n_blocks=parts.n_blocks, hidden=hidden,
                   intermediate=getattr(cfg, "intermediate_size", None)
                   or getattr(cfg, "n_inner", None) or 4 * hidden,
                   vocab=parts.embed.weight.shape[0],
                   block_params=sum(p.numel() for p in block.parameters()),
                   embed_params=embed, head_params=0 if tied else parts.head.weight.numel(),
                   lora_unit=unit, weight_bytes=weight.element_size(),
                   act_bytes=weight.element_size())


class Workload(_Frozen):
    """What every node does in a round (run-wide settings)."""

    mode: SplitMode = SplitMode.U_SHAPE
    batch: int = Field(8, ge=1)
    seq: int = Field(512, ge=1)
    steps: int = Field(50, ge=1)
    """Local steps per round."""
    server_rank: int = Field(8, ge=1)
    """The trunk adapter's rank (one trunk copy, shared by every node)."""
    server_workers: int = Field(1, ge=1)
    """Split-server workers sharing the trunk work."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


class Candidate(NamedTuple):
    a: int
    b: int
    rank: int
    codec: str


class Estimate(NamedTuple):
    """Seconds (and bytes) one candidate costs one node; see the module docstring."""

    site_s: float
    wire_s: float
    server_s: float
    hold_s: float  # how long each step of this node keeps the shared trunk from everyone else
    sync_s: float
    step_s: float  # site + wire + server, without the sync
    round_s: float
    busy_s: float
    memory_bytes: int


def hops(mode: SplitMode) -> tuple[int, int]:
    """(up, down) messages per step: u-shape activation a + gradient b up, activation b +
    gradient a down; vanilla activation up, gradient down."""
    return (2, 2) if mode is SplitMode.U_SHAPE else (1, 1)


def site_blocks(spec: ModelSpec, a: int, b: int) -> int:
    return a + spec.n_blocks - b


def lora_params(spec: ModelSpec, blocks: int, rank: int) -> int:
    return blocks * rank * spec.lora_unit


def message_bytes(spec: ModelSpec, work: Workload, codec: CodecOption) -> float:
    """Wire bytes of one hidden-state message (B, T, C) after the codec."""
    return work.tokens * spec.hidden * spec.act_bytes / codec.ratio


def site_memory(spec: ModelSpec, work: Workload, a: int, b: int, rank: int) -> int:
    """Bytes a site needs: frozen weights of its blocks, embeddings (+ head in u-shape), LoRA
    with gradients and AdamW state, and the activations its backward keeps."""
    u = work.mode is SplitMode.U_SHAPE
    n = site_blocks(spec, a, b)
    frozen = (n * spec.block_params + spec.embed_params + (spec.head_params if u else 0)) \
        * spec.weight_bytes
    lora = lora_params(spec, n, rank) * ADAM_BYTES
    acts = work.tokens * n * spec.act_elems_per_token * spec.act_bytes
    logits = work.tokens * 2 * spec.vocab * 4 if u else 0  # fp32 logits and their gradient
    return frozen + lora + acts + logits


def compute_s(profile: NodeProfile, spec: ModelSpec, work: Workload, blocks: int, rank: int,
              head: bool) -> float:
    """Forward + backward seconds of `blocks` blocks with LoRA of `rank` (+ the head)."""
    scale = work.tokens / profile.ref_tokens
    lora = 1 + rank * spec.lora_unit / spec.block_params  # LoRA's extra FLOPs per block
    return scale * (blocks * profile.block_s * lora + (profile.head_s if head else 0.0))


def estimate(spec: ModelSpec, work: Workload, node: NodeProfile, server: NodeProfile,
             cand: Candidate, codec: CodecOption) -> Estimate:
    """The delay model of the module docstring for one node and one candidate."""
    u = work.mode is SplitMode.U_SHAPE
    n_site = site_blocks(spec, cand.a, cand.b)
    site_s = compute_s(node, spec, work, n_site, cand.rank, head=u)
    server_s = compute_s(server, spec, work, cand.b - cand.a, work.server_rank, head=not u)
    up, down = hops(work.mode)
    msg = message_bytes(spec, work, codec)
    raw = work.tokens * spec.hidden * spec.act_bytes
    coding = raw / codec.bytes_per_s if codec.bytes_per_s else 0.0  # encode + decode, per message
    hop_up = msg / node.up_bytes_per_s + node.rtt_s / 2 + coding
    hop_down = msg / node.down_bytes_per_s + node.rtt_s / 2 + coding
    wire_s = up * hop_up + down * hop_down
    hold_s = server_s
    if u:  # the trunk waits from its forward to its backward: the site's tail and two hops
        hold_s += hop_down + compute_s(node, spec, work, spec.n_blocks - cand.b, cand.rank,
                                       head=True) + hop_up
    adapter = lora_params(spec, n_site, cand.rank) * 4 / codec.adapter_ratio  # fp32 LoRA
    sync_s = adapter / node.up_bytes_per_s + adapter / node.down_bytes_per_s + node.rtt_s
    step_s = site_s + wire_s + server_s
    return Estimate(site_s, wire_s, server_s, hold_s, sync_s, step_s, work.steps * step_s + sync_s,
                    work.steps * hold_s, site_memory(spec, work, cand.a, cand.b, cand.rank))


def makespan(estimates: list[Estimate], workers: int = 1) -> float:
    """The round's makespan: the slowest node's round, or the time the nodes hold the shared
    trunk in all if longer (the steady state of the server's order; see the module docstring)."""
    return max(max(e.round_s for e in estimates), sum(e.busy_s for e in estimates) / workers)


def scheduled_s(estimates: list[Estimate], steps: int) -> float:
    """The round as the shared split server runs it, one worker: step-major, nodes in the given
    order (the server's: sorted ids), each turn starting once the trunk is free and the node's
    request is in, and holding the trunk hold_s. A node's request comes step_s - hold_s after
    its previous turn ended (its first that long after the start); its round ends with its sync.
    Never below `makespan`; above it by the ramp-up and drain, at most about a step."""
    out = [e.step_s - e.hold_s for e in estimates]  # each step's time away from the trunk
    ready, free = list(out), 0.0
    for _ in range(steps):
        for i, e in enumerate(estimates):
            free = max(free, ready[i]) + e.hold_s
            ready[i] = free + out[i]
    return max(r - o + e.sync_s for r, o, e in zip(ready, out, estimates))


def measure_codec(name: str, stages: tuple[str, ...], sample: torch.Tensor,
                  adapter_stages: tuple[str, ...] | None = None,
                  adapter_sample: torch.Tensor | None = None, repeats: int = 3) -> CodecOption:
    """A CodecOption measured on real tensors: ratio and encode+decode speed of `stages` on
    `sample` (a hidden state (B, T, C)), and the adapter ratio on `adapter_sample`."""
    from .compression import roundtrip

    raw = sample.numel() * sample.element_size()
    best, sent = float("inf"), raw
    for _ in range(repeats):
        started = time.perf_counter()
        _, sent = roundtrip(sample, stages)
        best = min(best, time.perf_counter() - started)
    adapter_ratio = 1.0
    if adapter_stages and adapter_sample is not None:
        _, n = roundtrip(adapter_sample, adapter_stages)
        adapter_ratio = adapter_sample.numel() * adapter_sample.element_size() / n
    return CodecOption(name=name, ratio=raw / sent, bytes_per_s=raw / max(best, 1e-9),
                       adapter_ratio=adapter_ratio)
