"""The agent's own state: what lets it resume exactly, after a restart or a repeated round.

On disk (after every round it finished): its optimizer and its position in its data. In memory
(at the start of every round): the same, so a round the coordinator starts again (after the
coordinator itself restarted) is replayed from the same point and nothing is applied twice.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fsl_edge.atomic import write_atomic
from fsl_edge.data import BatchStream
from fsl_edge.state_io import restore_optimizer, save_optimizer
from fsl_edge.step import SitePart


@dataclass
class RoundSnapshot:
    round: int
    optimizer: dict
    stream: dict
    selection: dict
    sync: tuple = (None, None, {})  # the agent's adapter copy, its name, the upload residual

    @classmethod
    def take(cls, round_: int, part: SitePart, stream: BatchStream) -> RoundSnapshot:
        return cls(round_, copy.deepcopy(part.optimizer.state_dict()), stream.state_dict(),
                   copy.deepcopy(part.selector.state_dict()))

    def restore(self, part: SitePart, stream: BatchStream) -> None:
        # the selection first: it decides which parameters the optimizer state belongs to
        part.selector.load_state_dict(copy.deepcopy(self.selection), part.optimizer)
        part.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        stream.load_state_dict(self.stream)


def save(workdir: Path, round_done: int, part: SitePart, stream: BatchStream) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"site_r{round_done:06d}_{time.time_ns()}"  # unique: a replayed round writes anew
    save_optimizer(workdir, prefix, part.optimizer)
    # state.json last and naming its optimizer files: a crash in between leaves the old pair
    write_atomic(workdir / "state.json", json.dumps({"round": round_done, "optimizer": prefix,
                                                     "stream": stream.state_dict(),
                                                     "selection": part.selector.state_dict()}))
    for old in workdir.glob("site_r*_optimizer.*"):
        if not old.name.startswith(prefix):
            old.unlink(missing_ok=True)


def load(workdir: Path, part: SitePart, stream: BatchStream) -> int:
    """Restore the saved state if there is one; returns the last round it finished (0 if none)."""
    path = workdir / "state.json"
    if not path.is_file():
        return 0
    state = json.loads(path.read_text())
    if "selection" in state:
        part.selector.load_state_dict(state["selection"], part.optimizer)
    restore_optimizer(workdir, state["optimizer"], part.optimizer)
    stream.load_state_dict(state["stream"])
    return int(state["round"])
