"""Checkpoints in open_clip's run layout: `logs/<name>/checkpoints/{epoch_N,step_N}.pt`.

A checkpoint holds everything an exact resume needs: the model, optimizer and grad-scaler
state, the position in the data (epoch and batch within it; the data's randomness is a function
of seed, epoch and row, so nothing else is needed for the workers) and the RNG state of the
main process. It also holds the resolved config and what the model was trained on, for export.
Everything is stored as plain values (dict, list, str, numbers, None) and tensors, so it loads
with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
import zipfile
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
    """The main process's torch, NumPy and Python RNG states, as plain values and tensors, so
    a checkpoint loads with ``torch.load(weights_only=True)`` (nothing to unpickle)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            np.array(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"]), python_state["gauss"])
    )


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
    """Load a checkpoint written by `save_checkpoint` (onto the CPU), checked for what mgll
    reads from it.

    Loaded with ``weights_only=True``: a file that needs unpickling (arbitrary code) is refused,
    never unpickled. Every problem is a one-line `UserError` naming the file.
    """
    if path.is_dir():
        raise UserError(
            f"{path}: a folder, not a checkpoint; expected a .pt file written by mgll-train fit "
            f"(an exported model folder is loaded with open_clip as 'local-dir:{path}')"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch's advice on unpickling; our one line replaces it
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise UserError(_unreadable(path, err)) from None
    problem = _checkpoint_problem(state)
    if problem:
        raise UserError(f"{path}: not a checkpoint written by mgll-train fit ({problem})")
    return state


# How torch's weights-only unpickler words its refusal of a global it does not allow.
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
# What every mgll checkpoint holds, with the type each must have.
_REQUIRED = {"model_name": str, "state_dict": dict, "epoch": int, "step": int}
# What a training checkpoint (one with optimizer state, for --resume) also holds.
_FOR_RESUME = {"batch": int, "rng": dict, "optimizer": dict}


def _unreadable(path: Path, err: Exception) -> str:
    """One line on a file torch would not load: empty, not a torch file, pickled objects."""
    if path.stat().st_size == 0:
        why = "the file is empty"
    elif not zipfile.is_zipfile(path) and not _legacy_torch_file(path):
        why = "not a torch zip archive: truncated, or another kind of file"
    elif isinstance(err, pickle.UnpicklingError) and _WEIGHTS_ONLY_REFUSAL in str(err):
        return (
            f"{path}: checkpoint holds pickled objects (written by an older mgll?); "
            "refusing to unpickle it"
        )
    else:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        why = f"torch could not read it: {first[:200]}"
    return f"{path}: not a checkpoint written by mgll-train fit ({why})"


def _legacy_torch_file(path: Path) -> bool:
    """True for torch's pre-1.6 format, a pickle stream that starts with a protocol opcode."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _checkpoint_problem(state: Any) -> str | None:
    """What is wrong with a loaded checkpoint's structure, or None."""
    if not isinstance(state, dict) or not {"model_name", "state_dict"} <= state.keys():
        return "expected model_name and state_dict in it"
    expected = dict(_REQUIRED, **(_FOR_RESUME if "optimizer" in state else {}))
    missing = sorted(key for key in expected if key not in state)
    if missing:
        return f"{', '.join(missing)} missing; expected {', '.join(expected)}"
    for key, kind in expected.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key} is a {type(state[key]).__name__}, expected a {kind.__name__}"
    weights = state["state_dict"]
    if not weights or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        return "state_dict must map parameter names to tensors"
    if "rng" in state and not _rng_state_ok(state["rng"]):
        return "rng is not the RNG state mgll-train saves"
    return None


def _rng_state_ok(state: dict[str, Any]) -> bool:
    """True when ``state`` has the layout `rng_state` writes (so `set_rng_state` can apply it)."""
    numpy_state, python_state = state.get("numpy"), state.get("python")
    return (
        isinstance(state.get("torch"), torch.Tensor)
        and isinstance(numpy_state, dict)
        and {"kind", "keys", "pos", "has_gauss", "cached_gaussian"} <= numpy_state.keys()
        and isinstance(numpy_state["keys"], list)
        and isinstance(python_state, dict)
        and {"version", "internal", "gauss"} <= python_state.keys()
        and isinstance(python_state["internal"], list)
    )


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load the weights of checkpoint ``state`` (read from ``path``) into ``model``; a missing,
    unexpected or mis-shaped key is a one-line `UserError` naming the file."""
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:  # torch lists every missing, unexpected and mis-shaped key
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        detail = "; ".join(lines)
        if len(detail) > 300:
            detail = detail[:300] + " ..."
        raise UserError(
            f"{path}: its state_dict does not fit open_clip model {state['model_name']!r} "
            f"(expected every key and shape of the model: {detail})"
        ) from None


def resolve_resume(resume: str, checkpoints: Path) -> Path:
    """`latest` is the run's `epoch_latest.pt`; anything else is a path."""
    return checkpoints / "epoch_latest.pt" if resume == "latest" else Path(resume)
