"""The quality protocol's numbers as text: mean ± std over seeds, the table, the goals.

Pure functions over plain numbers, so they are unit-tested without a model (or Flower).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MIB = 2 ** 20


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1); None for the std of one value."""
    if not values:
        raise ValueError("no values: a row that never ran has no mean")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(values: list[float], digits: int = 4, scale: float = 1.0) -> str:
    """'mean ± std' of values x scale ('mean' alone for one value; '—' for none)."""
    if not values:
        return "—"
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def gap(value: float, reference: float) -> float:
    """How much higher `value` is than `reference`, in percent of the reference."""
    return (value - reference) / reference * 100


@dataclass
class RowSummary:
    """One row over every seed; lists hold one value per seed."""

    name: str
    per: dict[str, list[float]] = field(default_factory=dict)  # held-out loss per chapter
    overall: list[float] = field(default_factory=list)  # held-out loss, all chapters
    exact: list[float] = field(default_factory=list)  # exact-match fraction
    seconds: list[float] = field(default_factory=list)  # wall time of the row's training
    bytes_per_round: list[float] = field(default_factory=list)  # per site; [] when none
    by_kind: dict[str, list[float]] = field(default_factory=dict)  # bytes per round per site
    cost: tuple[float, int] | None = None  # site compute s per step, site peak bytes

    @property
    def loss(self) -> float:
        return mean_std(self.overall)[0]

    def add(self, per: dict[str, float], overall: float, exact: float | None, seconds: float,
            by_kind: dict[str, float]) -> None:
        """One seed's results."""
        for chapter, loss in per.items():
            self.per.setdefault(chapter, []).append(loss)
        self.overall.append(overall)
        self.exact += [] if exact is None else [exact]
        self.seconds.append(seconds)
        if by_kind:
            self.bytes_per_round.append(sum(by_kind.values()))
        for kind, n in by_kind.items():
            self.by_kind.setdefault(kind, []).append(n)


def bytes_by_kind(rows: list[RowSummary]) -> str:
    """'row: kind X MiB, ...; row: ...' for the rows that send anything (means over seeds)."""
    def kinds(r: RowSummary) -> str:
        means = {k.replace("_", " "): mean_std(v)[0] for k, v in r.by_kind.items()}
        return ", ".join(f"{k} {m / MIB:.2f}" for k, m in means.items() if m > 0)

    return "; ".join(f"{r.name}: {kinds(r)}" for r in rows if r.by_kind)


def table(rows: list[RowSummary], chapters: list[str]) -> list[str]:
    lines = ["| run | " + " | ".join(chapters) + " | all chapters | exact match (%) | site s / step"
             " | site peak MiB | MiB / round / site | wall s |",
             "|---|" + "---:|" * (len(chapters) + 6)]
    for r in rows:
        cost = ("—", "—") if r.cost is None else (f"{r.cost[0]:.3f}", f"{r.cost[1] / MIB:.0f}")
        lines.append(f"| {r.name} | " + " | ".join(fmt(r.per[c]) for c in chapters)
                     + f" | **{fmt(r.overall)}** | {fmt(r.exact, 1, 100)} | {cost[0]} | {cost[1]}"
                     f" | {fmt(r.bytes_per_round, 2, 1 / MIB)} | {fmt(r.seconds, 0)} |")
    return lines


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def loss_goals(central: RowSummary, fsl: list[RowSummary], alone: list[RowSummary]) -> list[str]:
    """fsl-edge within 2 % of centralised held-out loss, and better than every site alone."""
    lines = []
    for r in fsl:
        g = gap(r.loss, central.loss)
        best_alone = min(alone, key=lambda a: a.loss)
        lines.append(f"- {r.name}: held-out loss {r.loss:.4f} vs centralised {central.loss:.4f}: "
                     f"**{g:+.2f} %** (goal within 2 %: {verdict(g <= 2.0)}); vs the best site "
                     f"alone ({best_alone.name}, {best_alone.loss:.4f}): "
                     f"{verdict(all(r.loss < a.loss for a in alone))} (goal: better than every "
                     "site alone).")
    return lines


def cost_goals(fsl: RowSummary, flower: RowSummary) -> list[str]:
    """At equal held-out loss (fsl-edge within 2 % of Flower's, or better): site compute per
    step <= 1/3 and site peak memory <= 1/2 of Flower's whole-model FedAvg-LoRA."""
    if fsl.cost is None or flower.cost is None:
        return ["- site cost vs Flower: not measured."]
    g = gap(fsl.loss, flower.loss)
    compute, memory = fsl.cost[0] / flower.cost[0], fsl.cost[1] / flower.cost[1]
    return [f"- {fsl.name} vs {flower.name}: held-out loss {g:+.2f} % of Flower's "
            f"(equal within 2 %, or better: {verdict(g <= 2.0)}); site compute per step "
            f"**{compute:.2f}x** of Flower's (goal <= 0.33: {verdict(compute <= 1 / 3)}); site peak "
            f"memory **{memory:.2f}x** (goal <= 0.50: {verdict(memory <= 0.5)})."]
