"""Checkpoints in open_clip's run layout: `logs/<name>/checkpoints/{epoch_N,step_N}.pt`.

A checkpoint holds everything an exact resume needs: the model, optimizer and grad-scaler
state, the position in the data (epoch and batch within it; the data's randomness is a function
of seed, epoch and row, so nothing else is needed for the workers) and the RNG state of the
main process. It also holds the resolved config and what the model was trained on, for export.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError


@dataclass
class Run:
    """A run directory in open_clip's layout: `out.log`, `config.yaml`, `checkpoints/`, ..."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        """The copy of the newest checkpoint that `--resume latest` loads."""
        return self.checkpoints / "epoch_latest.pt"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def rng_state() -> dict[str, Any]:
    """The main process's torch, NumPy and Python RNG states."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, state: dict[str, Any], latest: Path | None = None) -> None:
    """Write atomically (a killed save never leaves a half file); also update `latest`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if latest is not None and latest != path:
        tmp = latest.with_name(latest.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, latest)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (onto the CPU)."""
    if path.is_dir():
        raise UserError(
            f"{path}: a folder, not a checkpoint; expected a .pt file written by mgll-train fit "
            f"(an exported model folder is loaded with open_clip as 'local-dir:{path}')"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise UserError(f"{path}: not a checkpoint written by mgll-train fit ({err})") from err
    if not isinstance(state, dict) or not {"model_name", "state_dict"} <= state.keys():
        raise UserError(
            f"{path}: not a checkpoint written by mgll-train fit (expected model_name and "
            "state_dict in it)"
        )
    return state


def resolve_resume(resume: str, checkpoints: Path) -> Path:
    """`latest` is the run's `epoch_latest.pt`; anything else is a path."""
    return checkpoints / "epoch_latest.pt" if resume == "latest" else Path(resume)
