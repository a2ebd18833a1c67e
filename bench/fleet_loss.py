"""bench/fleet.py's held-out loss check: a fleet's cuts and ranks trained on the tiny model.

Each node becomes a simulated site with its class's text (fast, mid, slow: three phrasings, so
the sites are not IID) and its cut mapped proportionally from the 30-block model to the tiny
model's 6 blocks, its rank kept.
"""

from __future__ import annotations

from fsl_edge.config import LearningSettings, LoraSettings, SplitMode, TrainSettings
from fsl_edge.data import Sample, tokenize
from fsl_edge.simulation import SiteData, simulate
from fsl_edge.tiny import tiny_model, tiny_tokenizer

TEXTS = {"fast": "{:03d} the cat sat on the mat by the door.", "mid": "{:03d} a dog ran round the park.",
         "slow": "{:03d} birds sing loudly at dawn in spring."}
PER_SITE = 140  # examples: 120 to train on, 20 held out


def tiny_pin(a: int, b: int, rank: int, mode: SplitMode, n: int = 30, m: int = 6) -> dict:
    """A 30-block cut mapped to the tiny model's 6 blocks (at least 1 front block and, in
    u-shape, 1 back block)."""
    if mode is SplitMode.VANILLA:
        return {"front": min(max(1, round(a * m / n)), m - 1), "rank": rank}
    front = min(max(1, round(a * m / n)), m - 2)
    back = min(max(1, round((n - b) * m / n)), m - 1 - front)
    return {"front": front, "back": back, "rank": rank}


def sites(names: list[str]) -> list[SiteData]:
    """A site per node name ('slow' or 'slow-02': class, then its number in the class)."""
    tok, out = tiny_tokenizer(), []
    for name in names:
        cls, _, k = name.partition("-")
        offset = PER_SITE * int(k or 0)  # the class's nodes hold different examples
        ex = tokenize([Sample("", TEXTS[cls].format(i + offset)) for i in range(PER_SITE)], tok,
                      max_len=64)
        out.append(SiteData(name, ex[:120], ex[120:]))
    return out


def heldout(pins: dict[str, dict], mode: SplitMode, rounds: int, steps: int) -> list[float]:
    """The held-out loss (every site's, token-weighted) before training and after each round."""
    learning = LearningSettings(lora=LoraSettings(rank=8, alpha=16), split={"mode": mode},
                                train=TrainSettings(lr=1e-2, batch_size=4, rounds=rounds, steps=steps),
                                compression={"preset": "none"}, planner={"pins": pins})
    result = simulate(tiny_model("llama"), sites(sorted(pins)), learning, tiny_tokenizer().pad_token_id)
    return [r.heldout_loss_all for r in result.rounds]
