"""The random generators a resumed run needs to continue exactly: the shared sampling/augmentation generator (the
same on every rank) and each rank's own global torch and CUDA generators (dropout)."""

from __future__ import annotations

import torch

from gliograde import runtime
from gliograde.training import distributed
from gliograde.training.distributed import Dist


def rng_state(generator: torch.Generator, d: Dist, device: torch.device) -> dict:
    """The generators to resume with: the shared sampling/augmentation generator, and each rank's own global
    generators (dropout draws differ per rank). A collective under DDP: every rank calls it."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    ranks = distributed.gather(d, mine)
    return {"torch": ranks[0]["torch"], "generator": generator.get_state(), "cuda": runtime.cuda_rng_states(),
            "ranks": ranks}  # fmt: skip


def set_rng_state(state: dict, generator: torch.Generator, d: Dist, device: torch.device) -> str | None:
    """Restores the saved generators (this rank's own where the run recorded them); returns a note where the run
    had a different number of GPUs than this machine."""
    generator.set_state(state["generator"])
    ranks = state.get("ranks")
    if ranks and len(ranks) == d.world:
        mine = ranks[d.rank]
        torch.set_rng_state(mine["torch"])
        if device.type == "cuda" and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], device)
        return None
    torch.set_rng_state(state["torch"])  # a run saved before per-rank states were kept
    return runtime.restore_cuda_rng_states(state.get("cuda", []))
