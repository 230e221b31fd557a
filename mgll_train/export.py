"""`mgll-train export`: a checkpoint -> a folder plain open_clip loads with `local-dir:`.

Writes `open_clip_config.json` (`model_cfg` and `preprocess_cfg`), `open_clip_model.safetensors`
and a model card `README.md` listing what the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
from safetensors.torch import save_file

from .checkpoint import load_checkpoint
from .errors import UserError
from .model import register_model_configs, weights_loaded_next


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Export `checkpoint` into `out`; return `out`."""
    state = load_checkpoint(checkpoint)
    register_model_configs()
    model_name = state["model_name"]
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise UserError(f"{checkpoint}: model {model_name!r} is not an open_clip config")
    weights = {k: v.detach().contiguous() for k, v in state["state_dict"].items()}
    if "logit_bias" in weights:
        model_cfg["init_logit_bias"] = float(weights["logit_bias"])
    with weights_loaded_next():  # only its preprocessing config is read; the weights are saved
        model = open_clip.create_model(model_name, pretrained=None)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(weights, str(out / "open_clip_model.safetensors"))
    (out / "README.md").write_text(_model_card(state, model_name))
    return out


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
