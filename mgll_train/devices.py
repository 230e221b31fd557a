"""`--device` of `fit` and `eval`: the device asked for, or the CPU where it is not here."""

from __future__ import annotations

from .errors import UserError


def usable_device(name: str) -> tuple[str, str | None]:
    """``(device, warning)``: ``name`` when this machine has it; ``"cpu"`` and a one-line
    warning when ``name`` is a known accelerator that is not available here.

    Checked before open_clip sets the device up, so its own fallback warning (which carries
    its file path) never shows. A name torch does not know is a `UserError`.
    """
    from open_clip_train.distributed import is_device_available  # loads torch

    try:
        available, known = is_device_available(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a torch device ({err})") from err
    if known and not available:
        kind = name.split(":", 1)[0]
        return "cpu", f"--device {name}: no {kind} device is available here; running on the CPU"
    return name, None
