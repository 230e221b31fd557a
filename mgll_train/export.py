"""`mgll-train export`: a checkpoint -> a folder plain open_clip loads with `local-dir:`.

Writes `open_clip_config.json` (`model_cfg` and `preprocess_cfg`), `open_clip_model.safetensors`
and a model card `README.md` listing what the model was trained on. The folder is written beside
`--out` first and loaded back the way a user loads it; only an exact copy of the checkpoint's
weights is moved into `--out`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from .checkpoint import load_checkpoint
from .errors import UserError
from .model import model_from_checkpoint

WEIGHTS = "open_clip_model.safetensors"


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Export `checkpoint` into `out`, verified by loading it back with open_clip; return `out`."""
    state = load_checkpoint(checkpoint)
    bundle = model_from_checkpoint(state, checkpoint)  # refuses weights that do not fit
    model_name = state["model_name"]
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise UserError(f"{checkpoint}: model {model_name!r} is not an open_clip config")
    weights = {k: v.detach().contiguous() for k, v in state["state_dict"].items()}
    if "logit_bias" in weights:
        model_cfg["init_logit_bias"] = float(weights["logit_bias"])
    config = {"model_cfg": model_cfg, "preprocess_cfg": bundle.preprocess_cfg}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "open_clip_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(weights, str(staging / WEIGHTS))
        os.chmod(staging / WEIGHTS, _file_mode())  # safetensors writes 0600; others may read it
        (staging / "README.md").write_text(_model_card(state, model_name))
        try:
            verify_export(staging, weights, checkpoint)
        except UserError as err:
            raise UserError(f"{err}; {out} left as it was") from None
        out.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir()):
            os.replace(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _file_mode() -> int:
    """The mode a new file gets here: 0666 less the process's umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    return 0o666 & ~umask


def verify_export(folder: Path, weights: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Load `folder` as a user would (`local-dir:`) and require exactly `weights` (the
    checkpoint's, bit for bit); anything else is a `UserError`."""
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    loaded = model.state_dict()
    differ = sorted(set(loaded) ^ set(weights)) or [
        key for key, value in weights.items() if not _same_bits(loaded[key], value)
    ]
    if differ:
        raise UserError(
            f"{checkpoint}: the model exported to {folder} loads with other weights than the "
            f"checkpoint's ({len(differ)} tensors differ, e.g. {differ[0]})"
        )


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN equals NaN, and -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().cpu().reshape(-1).view(torch.uint8),
        b.detach().cpu().reshape(-1).view(torch.uint8),
    )


def _model_card(state: dict, model_name: str) -> str:
    """The README.md of the exported folder: what was trained on what, and how to load it."""
    config = state.get("config", {})
    labels = ", ".join(state.get("label_names", []))
    return "\n".join(
        [
            "---",
            "library_name: open_clip",
            "tags: [mgll, medical, clip, zero-shot-image-classification]",
            "---",
            f"# {state.get('name', 'mgll model')}",
            "",
            f"An open_clip `{model_name}` trained by `mgll-train` with `--loss "
            f"{config.get('loss', 'mgll')}` for {state['step']} steps ({state['epoch']} epochs).",
            "",
            "## Training data",
            "",
            f"- `--train-data {state.get('train_data')}` (split `{config.get('train-split')}`)",
            f"- granularities: {config.get('granularities')}",
            f"- labels: {labels}",
            "",
            "## Load",
            "",
            "```python",
            "import open_clip",
            'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH")',
            'tokenizer = open_clip.get_tokenizer("local-dir:PATH")',
            "```",
            "",
            "## Training configuration",
            "",
            "```yaml",
            *(f"{k}: {v}" for k, v in sorted(config.items())),
            "```",
            "",
        ]
    )
