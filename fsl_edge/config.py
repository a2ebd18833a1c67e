"""Typed, documented settings for the learning core: one pydantic model per concern.

Each field's docstring is the documentation a user reads; validators reject a bad value with a
message naming the field and what is allowed.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import SplitError
from .planner_settings import PlannerSettings


class SplitMode(str, Enum):
    U_SHAPE = "u-shape"
    """Default. The site keeps embeddings, the first and the last blocks, the head and the loss:
    token ids and labels never leave the site."""
    VANILLA = "vanilla"
    """Opt-in. The site keeps only embeddings and the first blocks; the server computes the loss,
    so the labels (= the text, shifted by one) are sent to it. Half the traffic; leaks the text."""


class ServerCopies(str, Enum):
    SHARED = "shared"
    """Default (SplitFed-V2). One trunk copy, trained by every site's steps in turn, served by
    the coordinator itself."""
    PER_SITE = "per-site"
    """SplitFed-V1. Each site's steps train its own copy of the round's trunk (fresh optimizer
    state each round); the round closes with the token-weighted average of the copies. Served by
    split-server workers (`fsl-edge worker`), any number, which share the sites through an MQTT
    shared subscription: the result does not depend on how many or which worker serves a site."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    """LoRA adapters (peft) on both sides of the split."""

    rank: int = Field(8, ge=1, le=1024)
    """LoRA rank r. SplitLoRA uses 2-4 on GPT-2; 8 is peft's default."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA path. 0 keeps split runs bit-reproducible across processes."""
    target_modules: tuple[str, ...] | None = None
    """Module names (suffixes) that get adapters; None picks the family's default
    (attention projections)."""
    site_freeze_a: bool = False
    """FFA-LoRA at the sites (Sun et al., ICLR 2024): keep the shared random A of every site
    adapter fixed and train only B, so that averaging the sites' B averages their updates B·A
    exactly; plain FedAvg of A and B separately does not, across non-IID sites."""
    quantize: str | None = None
    """'4bit' loads the frozen base in NF4 via bitsandbytes (QLoRA). Needs CUDA."""

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: str | None) -> str | None:
        if v not in (None, "4bit"):
            raise ValueError(f"quantize must be '4bit' or unset, not {v!r}")
        return v


class SplitSettings(_Strict):
    """Where the model is cut between site and server."""

    mode: SplitMode = SplitMode.U_SHAPE
    """u-shape (labels stay at the site) or vanilla (labels are sent; see SplitMode)."""
    front: int | None = Field(None, ge=0)
    """Blocks the site runs before the server's part: the cut a. None: 2 (or 1 in a tiny model)."""
    back: int | None = Field(None, ge=0)
    """u-shape only: blocks the site runs after the server's part (L - b). None: 1."""
    server: ServerCopies = ServerCopies.SHARED
    """shared: one trunk copy served by the coordinator; per-site: a copy per site, averaged
    each round, served by split-server workers that scale out (see ServerCopies)."""

    def cut(self, n_blocks: int) -> "Cut":
        """Resolve to block indices for a model of `n_blocks` blocks, or raise SplitError."""
        front = self.front if self.front is not None else (2 if n_blocks >= 6 else 1)
        if self.mode is SplitMode.VANILLA:
            if self.back not in (None, 0):
                raise SplitError("vanilla mode has no site-side back blocks: leave `back` unset")
            cut = Cut(mode=self.mode, a=front, b=n_blocks, n=n_blocks)
        else:
            back = self.back if self.back is not None else 1
            cut = Cut(mode=self.mode, a=front, b=n_blocks - back, n=n_blocks)
        cut.check()
        return cut


class Cut(BaseModel):
    """A resolved split: the server runs blocks [a, b); the site runs [0, a) and [b, n)."""

    model_config = ConfigDict(frozen=True)

    mode: SplitMode
    a: int
    b: int
    n: int

    def check(self) -> None:
        if not 1 <= self.a:
            raise SplitError(f"cut a={self.a} leaves the site no front block: the server would "
                             "receive embeddings, which reveal the token ids; use a >= 1")
        if self.b > self.n or self.a > self.n:
            raise SplitError(f"cut ({self.a}, {self.b}) is outside a model of {self.n} blocks")
        if self.a >= self.b:
            raise SplitError(f"cut ({self.a}, {self.b}) leaves the server no blocks "
                             f"(the model has {self.n}); the server needs a < b")
        if self.mode is SplitMode.U_SHAPE and self.b == self.n:
            raise SplitError(f"u-shape cut b={self.b} leaves the site no back block "
                             f"(the model has {self.n}); use back >= 1")

    @property
    def site_blocks(self) -> list[int]:
        return list(range(self.a)) + list(range(self.b, self.n))

    @property
    def server_blocks(self) -> list[int]:
        return list(range(self.a, self.b))


class TrainSettings(_Strict):
    """Optimisation and batching, the same at every site."""

    lr: float = Field(2e-4, gt=0)
    """AdamW learning rate for the LoRA weights on both sides."""
    batch_size: int = Field(8, ge=1)
    """Samples per local step."""
    max_len: int = Field(64, ge=2)
    """Tokens per sample after truncation."""
    server_lr: float = Field(1.0, gt=0)
    """Server learning rate of the site-adapter aggregation (FedOpt): the global site adapter
    moves by server_lr x the token-weighted mean of the sites' updates. 1 is plain FedAvg."""
    rounds: int = Field(3, ge=1)
    """Federated rounds: each ends with FedAvg of the site adapters."""
    steps: int = Field(10, ge=1)
    """Local steps per site per round."""
    seed: int = 0
    """Seeds adapter init, shuffling and every RNG, so runs are reproducible."""


class Preset(str, Enum):
    """Named compressions; their pipelines are in `fsl_edge.compression.PRESETS`."""

    NONE = "none"
    LOSSLESS = "lossless"
    BALANCED = "balanced"
    AGGRESSIVE = "aggressive"


class CompressionSettings(_Strict):
    """What travels on the wire: a named preset, and per-kind pipelines that override it.

    A pipeline is a list of codec stages (see `fsl_edge.codec`), e.g.
    ``["qblock:bits=4,block=64,outliers=8", "zstd"]``; each envelope records its own, so a
    receiver needs nothing else to decode.
    """

    preset: Preset = Preset.LOSSLESS
    """none (fp32), lossless (shuffle+zstd), balanced (int4 steps, top-k adapter deltas) or
    aggressive; measured ratios and quality costs are in BENCHMARKS.md."""
    activations: tuple[str, ...] | None = None
    """Pipeline for activation_up/down; None takes the preset's."""
    gradients: tuple[str, ...] | None = None
    """Pipeline for gradient_up/down; None takes the preset's."""
    upload: tuple[str, ...] | None = None
    """Pipeline for the agents' adapter deltas (``randtopk:k=...`` first for top-k with error
    feedback); None takes the preset's."""
    download: tuple[str, ...] | None = None
    """Pipeline for the site adapter deltas sent to the agents; None takes the preset's."""

    @field_validator("activations", "gradients", "upload", "download")
    @classmethod
    def _valid_pipeline(cls, v, info):
        from .compression import check_pipeline
        return v if v is None else check_pipeline(tuple(v), info.field_name)

    def pipelines(self):
        """The preset with this configuration's overrides (a compression.Pipelines)."""
        from .compression import PRESETS
        import dataclasses
        fields = ("activations", "gradients", "upload", "download")
        return dataclasses.replace(PRESETS[self.preset.value], **{k: getattr(self, k) for k in fields
                                                             if getattr(self, k) is not None})


class Policy(str, Enum):
    """Which LoRA blocks of a party train in an epoch (see `fsl_edge.selection`)."""

    ALL = "all"
    """Every block with LoRA trains every step."""
    TOPK_GRADNORM = "topk-gradnorm"
    """After each epoch, keep the `fraction` of blocks with the largest gradient norms trainable."""
    FREEZE_FRONT = "freeze-front"
    """AutoFreeze: after each epoch, freeze blocks from the front while their gradient norm
    changed by less than `threshold`; the frozen front grows the site's cacheable prefix."""
    RANDOM = "random"
    """LISA-style control: the same budget as topk-gradnorm, blocks drawn at random each epoch."""


class SelectionSettings(_Strict):
    """Layer selection: which LoRA blocks train, re-decided at every epoch, on both sides."""

    policy: Policy = Policy.ALL
    """all, topk-gradnorm, freeze-front or random."""
    fraction: float = Field(0.3, gt=0.0, le=1.0)
    """topk-gradnorm and random: the share of a party's LoRA blocks kept trainable (at least 1)."""
    threshold: float = Field(0.1, gt=0.0)
    """freeze-front: a front block freezes once its mean gradient norm changed by less than this
    share between two epochs."""


class PrefixSettings(_Strict):
    """The site's frozen prefix: its first blocks without LoRA, whose outputs agents cache."""

    frozen: int = Field(0, ge=0)
    """Site blocks from the front with no LoRA (at most the cut a). Their output is computed one
    sample at a time (no padding, so it does not depend on the batch) and is the same every
    epoch: agents cache it on disk. 0: no frozen prefix, the front trains as usual."""
    send_keys: bool = False
    """Opt-in, needs frozen = the cut a: once the server holds a sample's prefix activation, the
    site sends only the sample's key. This keeps the site's prefix activations on the server
    (bounded by `server_max_bytes`, dropped when the prefix changes)."""
    server_max_bytes: int = Field(2 << 30, ge=4096)
    """send_keys: the most bytes of prefix activations the server keeps over all sites (least
    recently used go first; a site whose keys were dropped is asked for the activations again).
    Size it to hold every site's data: epochs visit samples in cycles, and a cycle longer than
    the bound misses on nearly every key, which costs more than sending activations at all."""
    backend: str = "auto"
    """What computes the frozen prefix: torch; onnxruntime (exported once per prefix, next to
    the cache; its CUDA provider when there is a GPU); or auto: onnxruntime on a CPU, where
    bench/cache.py measured it faster than eager torch (BENCHMARKS.md), torch on a GPU, where the ONNX
    Runtime path is not measured yet. Part of the prefix fingerprint."""

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("auto", "torch", "onnxruntime"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'onnxruntime', not {v!r}")
        return v


class RobustRule(str, Enum):
    NONE = "none"
    """FedAvg of the updates that pass the checks."""
    NORM_CLIP = "norm-clip"
    """Scale an update whose norm exceeds the bound down to the bound instead of dropping it."""
    TRIMMED_MEAN = "trimmed-mean"
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018) of the updates that pass."""


class RobustSettings(_Strict):
    """How the coordinator screens and combines the site adapter deltas of a round."""

    rule: RobustRule = RobustRule.NONE
    """none | norm-clip | trimmed-mean (see RobustRule)."""
    max_norm_ratio: float | None = Field(10.0, ge=1.0)
    """Bound on an update's L2 norm as a multiple of the median norm of the round's finite
    updates: over it, the update is rejected (clipped to it under norm-clip). None: no bound.
    A median of 0 makes every non-zero update exceed it."""
    trim: float = Field(0.1, ge=0.0, lt=0.5)
    """trimmed-mean only: the fraction of the n updates dropped at each end of every coordinate,
    floor(trim * n) values each side; 0.1 with fewer than 10 updates drops nothing."""
    quarantine_after: int = Field(3, ge=0)
    """Quarantine a node whose updates fail the checks this many rounds in a row (clipped ones
    count: they failed the norm check). 0: never quarantine."""
    quarantine_rounds: int | None = Field(10, ge=1)
    """How many rounds a quarantine lasts; None: for the rest of the run (no operator command
    lifts one yet, so the finite default keeps a wrongly quarantined site from being shut out
    for good)."""


class LearningSettings(_Strict):
    """Everything that determines what a run learns (besides the model and the data): the same
    for the simulation and the distributed runtime, and sent to every agent when it joins."""

    split: SplitSettings = Field(default_factory=SplitSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    compression: CompressionSettings = Field(default_factory=CompressionSettings)
    prefix: PrefixSettings = Field(default_factory=PrefixSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    robust: RobustSettings = Field(default_factory=RobustSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    """A cut and LoRA rank per node (fsl_edge.nodes): planned from the agents' profiles when
    `planner.enabled`, else pinned per node in `planner.pins`; nodes without either take `split`
    and `lora.rank`. Different cuts or ranks are aggregated per layer (fsl_edge.hetero)."""

    @model_validator(mode="after")
    def _prefix_fits(self) -> LearningSettings:
        # the cut a is known only with the model; `check_prefix` finishes the check then
        if self.prefix.send_keys and self.prefix.frozen == 0:
            raise ValueError("prefix.send_keys needs a frozen prefix: set prefix.frozen to the cut a")
        return self

    def check_prefix(self, cut: Cut) -> None:
        """Refuse a frozen prefix the cut cannot hold. In vanilla mode, frozen = a leaves the sites
        nothing to train: they send their (cached) activations and labels, the server trains
        the rest (the activation-caching report's design)."""
        frozen = self.prefix.frozen
        if frozen > cut.a:
            raise SplitError(f"prefix.frozen={frozen} is more than the site's {cut.a} front blocks "
                             "(the cut a)")
        if self.prefix.send_keys and frozen != cut.a:
            raise SplitError(f"prefix.send_keys needs prefix.frozen = the cut a ({cut.a}), so "
                             f"the activation at the cut is the cached prefix; it is {frozen}")


class Bounds(_Strict):
    """What a process holds for its peers, bounded (a slow or hostile agent cannot exhaust the
    coordinator's memory or stall the others). Whatever a bound drops is counted by reason in
    /status (overflow, evicted, queue_full, overload); every request is re-sent until answered,
    so an honest peer loses time, never an update."""

    reassembly_bytes: int = Field(1 << 30, ge=1 << 20)
    """Incomplete chunked messages held over all senders together. When full, the sender
    holding the most loses its oldest incomplete message (`evicted`) unless the one asking would
    then hold as much: then the new chunk is refused (`overflow`)."""
    reassembly_per_sender: int = Field(512 << 20, ge=1 << 20)
    """Incomplete chunked messages held for one sender (one topic); over it, `overflow`. A
    message larger than this (or than the envelope limit, 512 MiB) cannot be received."""
    chunk_deadline_s: float = Field(60.0, gt=0)
    """An incomplete chunked message is dropped this long after its first chunk (`expired`)."""
    inbox_per_sender: int = Field(64, ge=1)
    """Received messages from one sender waiting to be handled; further ones are dropped
    (`queue_full`). Senders are served in turn, so one that floods delays no one else. An
    honest agent has one request, a resend and a few heartbeats waiting at most."""
    inbox_bytes: int = Field(1 << 30, ge=1 << 20)
    """Received messages waiting to be handled, all senders together (each charged its size
    plus 2 KiB); when full, the sender holding the most loses its newest (`overload`)."""


class RuntimeSettings(_Strict):
    """How the coordinator and the agents talk: the broker, liveness and retry timing."""

    run_id: str = "demo"
    """Names the run on the broker (topics fsl/<run_id>/...); agents must use the same."""
    broker: str = "mqtt://127.0.0.1:1883"
    """The MQTT broker, mqtt://host:port."""
    max_packet: int = Field(1 << 20, ge=4096)
    """Largest MQTT packet sent; bigger messages are chunked. 1 MiB is EMQX's default limit."""
    heartbeat_s: float = Field(2.0, gt=0)
    """Agents send a heartbeat this often, also while they compute."""
    offline_after_s: float = Field(15.0, gt=0)
    """An agent not heard from for this long is offline (its last will says so sooner)."""
    resend_s: float = Field(10.0, gt=0)
    """A request unanswered for this long is sent again (the receiver applies it at most once)."""
    round_timeout_s: float = Field(1800.0, gt=0)
    """A round still open after this long closes with the adapters that arrived."""
    worker_lost_s: float = Field(120.0, gt=0)
    """split.server per-site: a site whose split-server worker has not answered a step for this
    long starts its round over on another worker (exact: its trunk copy depends only on its own
    batches). Longer than a busy worker's queue can hold a site up."""
    bounds: Bounds = Field(default_factory=Bounds)
    """Memory and queue bounds on what is received (see Bounds)."""

    @model_validator(mode="after")
    def _resends_beat_the_grace(self) -> RuntimeSettings:
        # An agent whose lost request is re-sent only after the coordinator has given up on it
        # loses its place in the round to every dropped packet or broker restart.
        for name in ("heartbeat_s", "resend_s"):
            if getattr(self, name) >= self.offline_after_s:
                raise ValueError(f"{name} ({getattr(self, name)}) must be shorter than "
                                 f"offline_after_s ({self.offline_after_s})")
        if self.worker_lost_s <= self.resend_s:
            raise ValueError(f"worker_lost_s ({self.worker_lost_s}) must be longer than resend_s "
                             f"({self.resend_s}): a worker gets at least one resend")
        return self

    def timing(self) -> dict[str, float]:
        """What the coordinator tells its agents: their heartbeats and resends must fit its grace."""
        return {"heartbeat_s": self.heartbeat_s, "resend_s": self.resend_s,
                "worker_lost_s": self.worker_lost_s}
