"""Aggregation across different cuts and LoRA ranks, as pure functions over adapter state dicts.

Different cuts: block i is trained by every site whose client part holds it and, on behalf of
the sites whose cut put it on the server, by the server's trunk copy. `aggregate` averages each
LoRA module over every party that trained it, a site weighted by its tokens and the server's
copy by the tokens of the sites it stood in for (`server_block_weights`).

Different ranks: a LoRA module is (A (r, d_in), B (d_out, r)) and adds s(r) * B @ A to the
frozen weight, with peft's scaling s(r) = alpha / r (alpha / sqrt(r) under rsLoRA). Two ways to
combine modules of different ranks:

- `method="pad"` (HetLoRA): zero-pad every A and B to the largest rank, rescaling B so that each
  party's s * B @ A is unchanged, and FedAvg A and B separately. With equal ranks it is plain
  FedAvg, bit for bit. Like plain FedAvg of LoRA it is exact for the product only when the
  parties share A (FFA-LoRA, `lora.site_freeze_a`) or B, or there is one party; otherwise
  mean(B) @ mean(A) differs from mean(B @ A) (cross terms).
- `method="svd"`: average the products s * B @ A themselves (that is the exact weighted mean of
  the parties' updates) and re-factorise by truncated SVD to `rank`, sqrt of the singular values
  to each side. Exact when `rank` >= the rank of the mean, which is at most the sum of the
  parties' ranks; below that it is the best rank-`rank` approximation (Eckart-Young). It moves
  A off its shared basis, so it does not suit FFA-LoRA's fixed A.

`hand_back` gives each party the modules it holds at its own rank by truncating the global
factors: for SVD factors (ordered by singular value) that is again the best approximation; for
padded factors it drops the components only higher-rank parties had.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from .aggregation import fedavg
from .errors import ConfigError

State = dict[str, torch.Tensor]
Weight = float | Mapping[int, float]  # tokens; per block for the server's trunk copy

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def block_index(key: str, blocks_name: str = "layers") -> int | None:
    """The block a state key belongs to (`...layers.3.self_attn...` -> 3), None outside blocks."""
    m = re.search(rf"(?:^|\.){re.escape(blocks_name)}\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def server_block_weights(cuts: Mapping[str, tuple[int, int]], tokens: Mapping[str, float]) -> dict[int, float]:
    """Block i -> tokens of the sites whose cut (a, b) put it on the server (a <= i < b): the
    weight of the server's trunk copy of block i."""
    out: dict[int, float] = {}
    for site, (a, b) in cuts.items():
        for i in range(a, b):
            out[i] = out.get(i, 0.0) + tokens[site]
    return out


def scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """peft's LoRA scaling: the update is scaling * B @ A."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int, scale: Callable[[int], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, d_in), B (d_out, r) -> rank `rank` >= r with zeros, s(rank) * B' @ A' = s(r) * B @ A."""
    r = A.shape[0]
    if rank < r:
        raise ConfigError(f"cannot pad a rank-{r} LoRA module to rank {rank}")
    if rank == r:
        return A, B  # untouched: equal ranks must reduce to plain FedAvg bit for bit
    A2 = torch.cat([A, A.new_zeros(rank - r, A.shape[1])])  # (rank, d_in)
    B2 = torch.cat([B * (scale(r) / scale(rank)), B.new_zeros(B.shape[0], rank - r)], dim=1)  # (d_out, rank)
    return A2, B2


def truncate_rank(A: torch.Tensor, B: torch.Tensor, rank: int, scale: Callable[[int], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` components of a module of rank R >= rank, rescaled for s(rank)."""
    R = A.shape[0]
    if rank > R:
        raise ConfigError(f"cannot truncate a rank-{R} LoRA module to rank {rank}")
    if rank == R:
        return A, B
    return A[:rank].clone(), B[:, :rank] * (scale(R) / scale(rank))  # (rank, d_in), (d_out, rank)


def refactor(delta: torch.Tensor, rank: int, scale: Callable[[int], float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rank, d_in), B (d_out, rank) with s(rank) * B @ A the best rank-`rank` approximation
    of `delta` (d_out, d_in); sqrt of the singular values on each side keeps them balanced."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    A = root[:, None] * Vh[:k]  # (k, d_in)
    B = U[:, :k] * root[None, :] / scale(rank)  # (d_out, k)
    if k < rank:  # the product has lower rank than asked: the remaining components are zero
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


def _weight(w: Weight, block: int | None) -> float:
    if isinstance(w, Mapping):
        return float(w.get(block, 0.0)) if block is not None else 0.0
    return float(w)


def _modules(state: Mapping[str, object]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """{module: (A key, B key)} and the keys that are not LoRA factors."""
    halves: dict[str, dict[str, str]] = {}
    other = []
    for k in state:
        m = _LORA.match(k)
        if m:
            halves.setdefault(m["module"], {})[m["which"]] = k
        else:
            other.append(k)
    for module, h in halves.items():
        if set(h) != {"A", "B"}:
            raise ConfigError(f"LoRA module {module} has lora_{next(iter(h))} but not its pair")
    return {mod: (h["A"], h["B"]) for mod, h in halves.items()}, other


def aggregate(parties: Sequence[tuple[State, Weight]], method: str = "pad", alpha: float = 1.0,
              rank: int | None = None, rslora: bool = False, blocks_name: str = "layers") -> State:
    """The global adapter: each key averaged over the parties holding it, by their weight for its
    block (a number: the same for every block). Ranks are combined by `method` (module
    docstring); `rank` is the SVD target (None: the largest rank among its holders). A key whose
    holders all have weight 0 (nobody trained it this round) is their plain mean."""
    if method not in ("pad", "svd"):
        raise ConfigError(f"unknown rank method {method!r}: use 'pad' or 'svd'")
    scale = lambda r: scaling(r, alpha, rslora)  # noqa: E731
    holders: dict[str, list[tuple[State, float]]] = {}
    for state, w in parties:
        for k in state:
            holders.setdefault(k, []).append((state, _weight(w, block_index(k, blocks_name))))
    modules, other = _modules(holders)  # the union of the parties' keys
    out: State = {}
    for k in other:
        states, ws = _who(holders[k])
        out[k] = fedavg([{k: s[k]} for s in states], ws)[k]
    for module, (ka, kb) in modules.items():
        states, ws = _who(holders[ka])
        if [id(s) for s, _ in holders[ka]] != [id(s) for s, _ in holders[kb]]:
            raise ConfigError(f"LoRA module {module}: some party holds only one of A and B")
        pairs = [(s[ka], s[kb]) for s in states]
        if method == "pad":
            top = max(A.shape[0] for A, _ in pairs)
            padded = [pad_rank(A, B, top, scale) for A, B in pairs]
            avg = fedavg([{"A": A, "B": B} for A, B in padded], ws)
            out[ka], out[kb] = avg["A"], avg["B"]
        else:
            target = rank or max(A.shape[0] for A, _ in pairs)
            total = float(sum(ws))
            mean = sum(w * scale(A.shape[0]) * (B.double() @ A.double())  # (d_out, d_in)
                       for (A, B), w in zip(pairs, ws)) / total
            A, B = refactor(mean, target, scale)
            out[ka], out[kb] = A.to(pairs[0][0].dtype), B.to(pairs[0][1].dtype)
    return out


def _who(held: list[tuple[State, float]]) -> tuple[list[State], list[float]]:
    """The holders that trained a key (positive weight), or all of them equally if none did."""
    trained = [(s, w) for s, w in held if w > 0]
    if not trained:
        return [s for s, _ in held], [1.0] * len(held)
    return [s for s, _ in trained], [w for _, w in trained]


def hand_back(global_state: State, mine: State, alpha: float = 1.0, rslora: bool = False) -> State:
    """The keys `mine` holds, from the global adapter, each LoRA module at `mine`'s rank (copies:
    the caller may train them in place)."""
    scale = lambda r: scaling(r, alpha, rslora)  # noqa: E731
    modules, other = _modules(mine)
    missing = [k for k in mine if k not in global_state]
    if missing:
        raise ConfigError(f"the global adapter lacks {len(missing)} keys of this party, e.g. {missing[0]}")
    out = {k: global_state[k] for k in other}
    for ka, kb in modules.values():
        r = mine[ka].shape[0]
        out[ka], out[kb] = truncate_rank(global_state[ka], global_state[kb], r, scale)
    return {k: v.clone() for k, v in out.items()}
