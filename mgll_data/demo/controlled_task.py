"""A controlled task where learning can be seen: `mgll-build-dataset demo --learnable`.

Synthetic grey chest radiographs in which every finding leaves its own visual sign, with a
location (side, zone) and a severity that change the sign, plus report-like texts at three
granularities whose finer levels carry what the category does not:

* category (the normal formatter): ``Cardiomegaly, Pleural Effusion``;
* description (an impression): ``Moderate cardiomegaly. Small right pleural effusion.``;
* explanation (findings): one sentence per finding naming side, zone and severity and what the
  sign looks like, plus explicit negatives for the other findings.

Eight findings carry signs (ChestX-ray14 names): Cardiomegaly (a wider heart, width by
severity), Effusion (a bright fluid level at one or both bases, height by severity),
Pneumothorax (a black apical crescent on one side), Atelectasis (a bright horizontal plate in a
lower zone), Consolidation (a dense bright patch in a zone), Edema (bilateral perihilar haze),
Nodule (a small bright dot in a zone) and Mass (a large bright blob in a zone). Labels follow
three latent syndromes (heart failure: cardiomegaly + edema + effusion; infection:
consolidation + effusion + atelectasis; neoplasm: nodule / mass) plus sporadic findings, so they
co-occur as in real data and are imbalanced (about 45 % `No Finding`).

Each image also gets a mask: the union of its findings' regions, a region being where the
sign's profile is at least half its peak (see `_draw_sign`), so it is empty for `No Finding`.

The release is written in the ChestX-ray14 layout (so the normal `chestxray14` pipeline builds
it, with patient-disjoint splits) plus ``reports.jsonl`` (image name → description,
explanation, the case, its random placement and its mask as SIIM-ACR run-length code). The
`learnable` pipeline builds it with the normal engine: its source is the ChestX-ray14 reader
plus the reports, which become the description and explanation (``text_origin``
``learnable_report``) and the `mask` column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .nih_release import _is_test_patient, bar_disabled, write_release_tables

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Mass",
    "Nodule",
    "Pneumothorax",
)
SEVERITIES = ("small", "moderate", "large")
SEVERITY_WORDS = {  # finding -> the three severity words
    "Cardiomegaly": ("mild", "moderate", "severe"),
    "Edema": ("mild", "moderate", "severe"),
    "Effusion": ("small", "moderate", "large"),
    "Pneumothorax": ("small", "moderate", "large"),
    "Atelectasis": ("minimal", "mild", "extensive"),
    "Consolidation": ("patchy", "moderate", "dense"),
    "Nodule": ("small", "small", "small"),
    "Mass": ("moderate", "large", "large"),
}
ZONES = ("upper", "middle", "lower")
ZONE_V = {"upper": -0.35, "middle": 0.0, "lower": 0.3}
NO_FINDING_DESCRIPTION = "No acute cardiopulmonary process."
NO_FINDING_EXPLANATION = (
    "The lungs are clear. The heart size is normal. There is no pleural effusion or "
    "pneumothorax. No focal consolidation, nodule or mass."
)
NEGATIVE_PHRASES = {
    "Cardiomegaly": "The heart size is normal.",
    "Effusion": "No pleural effusion.",
    "Pneumothorax": "No pneumothorax.",
    "Consolidation": "No focal consolidation.",
    "Edema": "No pulmonary edema.",
    "Atelectasis": "No atelectasis.",
    "Nodule": "No pulmonary nodule.",
    "Mass": "No mass.",
}


def sample_case(rng: np.random.Generator) -> dict[str, dict[str, Any]]:
    """One image's findings with their attributes: ``{finding: {side, zone, severity}}``."""
    if rng.random() < 0.45:
        return {}
    found: set[str] = set()
    syndrome = rng.choice(["heart", "infection", "neoplasm", "pneumothorax", "none"],
                          p=[0.3, 0.3, 0.2, 0.1, 0.1])  # fmt: skip
    if syndrome == "heart":
        found.add("Cardiomegaly")
        found |= {f for f, p in (("Edema", 0.55), ("Effusion", 0.5)) if rng.random() < p}
    elif syndrome == "infection":
        found.add("Consolidation")
        found |= {f for f, p in (("Effusion", 0.35), ("Atelectasis", 0.4)) if rng.random() < p}
    elif syndrome == "neoplasm":
        found.add("Nodule" if rng.random() < 0.6 else "Mass")
        if rng.random() < 0.15:
            found.add("Effusion")
    elif syndrome == "pneumothorax":
        found.add("Pneumothorax")
    sporadic = {"Atelectasis": 0.08, "Effusion": 0.06, "Nodule": 0.05, "Mass": 0.02}
    found |= {f for f, p in sporadic.items() if rng.random() < p}
    if not found:
        found.add(str(rng.choice(["Atelectasis", "Effusion", "Nodule"])))
    case = {}
    for finding in sorted(found):
        side = str(rng.choice(["right", "left"]))
        if finding == "Effusion" and ("Cardiomegaly" in found or rng.random() < 0.2):
            side = "bilateral"
        if finding in ("Cardiomegaly", "Edema"):
            side = "bilateral"
        zone = str(rng.choice(ZONES))
        if finding in ("Effusion", "Atelectasis"):
            zone = "lower"
        if finding == "Pneumothorax":
            zone = "upper"
        case[finding] = {"side": side, "zone": zone, "severity": int(rng.integers(0, 3))}
    return case


SIDE_SIGNS = {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}  # image-left: patient's right
HALF = 0.5  # a finding's region: where its sign reaches at least half its full strength


@dataclass(frozen=True)
class Drawing:
    """One rendered case: the radiograph, the union of its findings' regions (boolean, same
    pixels) and the random placement those regions depend on besides the case:
    ``{"shift": [du, dv], "centres": {finding: [cx, cy]}}`` in the image's unit coordinates."""

    image: np.ndarray
    mask: np.ndarray
    placement: dict[str, Any]


def render(case: dict[str, dict[str, Any]], size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey uint8 ``size``×``size`` radiograph showing each finding's sign."""
    return draw(case, size, rng).image


def draw(case: dict[str, dict[str, Any]], size: int, rng: np.random.Generator) -> Drawing:
    """Render `case` and the region of each finding it draws (see `_draw_sign`).

    Pixel (x, y) sits at u = (x - size/2) / (size/2) - du, v = (y - size/2) / (size/2) - dv."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (x - size / 2) / (size / 2)  # patient's right on the image left
    v = (y - size / 2) / (size / 2)
    shift = rng.normal(0, 0.02, 2)
    u, v = u - shift[0], v - shift[1]
    image = np.full((size, size), 0.08, np.float32)
    image[(u / 0.92) ** 2 + ((v - 0.1) / 1.1) ** 2 < 1] = 0.55
    lungs = np.zeros_like(image)
    for side in (-1, 1):
        lung = ((u - side * 0.4) / 0.3) ** 2 + ((v + 0.05) / 0.62) ** 2
        lungs = np.maximum(lungs, np.clip(1.2 - lung, 0, 1))
    image -= 0.35 * lungs
    image += 0.05 * np.clip(np.sin((v * 9 + 0.8 * u**2) * np.pi), 0, 1) ** 4 * (np.abs(u) < 0.75)
    heart_w = 0.22
    if "Cardiomegaly" in case:
        heart_w = (0.33, 0.38, 0.44)[case["Cardiomegaly"]["severity"]]
    heart = ((u + 0.06) / heart_w) ** 2 + ((v - 0.3) / 0.24) ** 2
    image += 0.35 * np.clip(1.3 - heart, 0, 1)
    image += 0.3 * np.exp(-((u / 0.07) ** 2))  # spine and mediastinum
    mask = np.zeros((size, size), bool)
    if "Cardiomegaly" in case:  # the enlarged heart itself
        mask |= np.clip(1.3 - heart, 0, 1) >= HALF
    centres: dict[str, list[float]] = {}
    for finding, a in case.items():
        mask |= _draw_sign(image, finding, a, (u, v, lungs), rng, centres)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    placement = {"shift": [float(shift[0]), float(shift[1])], "centres": centres}
    return Drawing((np.clip(image, 0, 1) * 255).astype(np.uint8), mask, placement)


def _draw_sign(
    image: np.ndarray,
    finding: str,
    a: dict[str, Any],
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
    centres: dict[str, list[float]],
) -> np.ndarray:
    """Add `finding`'s sign to `image` in place and return its region: where the sign's
    profile (before its strength and texture) is at least half its peak, or the whole sign
    where it is flat (effusion, pneumothorax). Records a nodule's or mass's centre."""
    u, v, lungs = grid
    sev = a["severity"]
    region = np.zeros(image.shape, bool)
    if finding == "Edema":
        haze = np.exp(-(((np.abs(u) - 0.22) / (0.18 + 0.05 * sev)) ** 2) - (v / 0.45) ** 2)
        image += (0.12 + 0.06 * sev) * haze * lungs
        region |= haze * lungs >= HALF
    elif finding == "Effusion":
        top = (0.42, 0.3, 0.15)[sev]
        for s in SIDE_SIGNS[a["side"]]:
            fluid = (v > top + 0.1 * np.abs(u - s * 0.4)) & (np.sign(u) == s) & (np.abs(u) < 0.72)
            image += 0.35 * fluid
            region |= fluid
    elif finding == "Pneumothorax":
        for s in SIDE_SIGNS[a["side"]]:
            width = (0.06, 0.1, 0.15)[sev]
            rim = ((u - s * 0.4) / 0.3) ** 2 + ((v + 0.1) / 0.6) ** 2
            crescent = (rim > 1 - width * 4) & (rim < 1.05) & (v < 0.0) & (s * u > 0.25)
            image[crescent] = 0.0
            region |= crescent
    elif finding == "Atelectasis":
        for s in SIDE_SIGNS[a["side"]]:
            band = np.exp(-(((v - 0.25) / 0.035) ** 2)) * (np.abs(u - s * 0.4) < 0.12 + 0.06 * sev)
            image += 0.3 * band
            region |= band >= HALF
    elif finding == "Consolidation":
        for s in SIDE_SIGNS[a["side"]]:
            cy = ZONE_V[a["zone"]]
            patch = np.exp(-(((u - s * 0.42) / 0.16) ** 2) - ((v - cy) / 0.14) ** 2)
            image += (0.22 + 0.08 * sev) * patch * (1 + 0.3 * rng.random(patch.shape))
            region |= patch >= HALF
    elif finding in ("Nodule", "Mass"):
        s = SIDE_SIGNS[a["side"]][0]
        cx = s * (0.35 + rng.uniform(-0.08, 0.08))
        cy = ZONE_V[a["zone"]] + rng.uniform(-0.08, 0.08)
        radius, amplitude = (0.06, 0.45) if finding == "Nodule" else ((0.14, 0.18, 0.22)[sev], 0.4)
        blob = np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / radius**2)
        image += amplitude * blob
        region |= blob >= HALF
        centres[finding] = [float(cx), float(cy)]
    return region


def encode_rle(mask: np.ndarray) -> str:
    """`mask` (height, width) in SIIM-ACR's run-length code: pairs (offset from the end of
    the previous run, length) over the pixels counted down columns; ``-1`` when empty."""
    flat = np.concatenate([[False], mask.T.ravel().astype(bool), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # run starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return "-1"
    offsets = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{o} {n}" for o, n in zip(offsets, ends - starts, strict=True))


def _phrase(finding: str, a: dict[str, Any]) -> str:
    sev = SEVERITY_WORDS[finding][a["severity"]]
    side, zone = a["side"], a["zone"]
    lung_side = "bilateral" if side == "bilateral" else f"{side}"
    return {
        "Cardiomegaly": f"{sev} cardiomegaly",
        "Edema": f"{sev} pulmonary edema",
        "Effusion": f"{sev} {lung_side} pleural effusion" + ("s" if side == "bilateral" else ""),
        "Pneumothorax": f"{sev} {side} apical pneumothorax",
        "Atelectasis": f"{sev} {side} basilar atelectasis",
        "Consolidation": f"{sev} {side} {zone} lobe consolidation",
        "Nodule": f"{side} {zone} lobe nodule",
        "Mass": f"{sev} {side} {zone} lobe mass",
    }[finding]


def _finding_sentence(finding: str, a: dict[str, Any]) -> str:
    sev = SEVERITY_WORDS[finding][a["severity"]]
    side, zone = a["side"], a["zone"]
    return {
        "Cardiomegaly": f"The cardiac silhouette is enlarged, {sev} cardiomegaly.",
        "Edema": f"There is {sev} bilateral perihilar haziness consistent with edema.",
        "Effusion": f"A {sev} {side} pleural effusion blunts the costophrenic angle"
        + (" on both sides." if side == "bilateral" else "."),
        "Pneumothorax": f"A {sev} {side} apical pneumothorax with a visible pleural line.",
        "Atelectasis": f"Plate-like {sev} atelectasis at the {side} lung base.",
        "Consolidation": f"{sev.capitalize()} airspace consolidation in the {side} {zone} zone.",
        "Nodule": f"A small rounded nodule projects over the {side} {zone} zone.",
        "Mass": f"A {sev} rounded mass in the {side} {zone} zone.",
    }[finding]


def report_texts(case: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """``(description, explanation)`` of a case."""
    if not case:
        return NO_FINDING_DESCRIPTION, NO_FINDING_EXPLANATION
    description = " ".join(_phrase(f, a).capitalize() + "." for f, a in case.items())
    findings = " ".join(_finding_sentence(f, a) for f, a in case.items())
    negatives = " ".join(NEGATIVE_PHRASES[f] for f in FINDINGS if f not in case)
    return description, f"{findings} {negatives}".strip()


def write_learnable_release(
    root: Path, n: int = 2000, seed: int = 0, image_size: int = 64, progress: bool | None = False
) -> Path:
    """The release (ChestX-ray14 layout) plus ``reports.jsonl``; deterministic for a seed.

    `progress`: show a bar (None: when stderr is a terminal)."""
    rng = np.random.default_rng([seed, 4242])
    bar = tqdm(
        total=n, desc="generate learnable release", unit="img", disable=bar_disabled(progress)
    )
    root.mkdir(parents=True, exist_ok=True)
    rows, reports, train_val, test = [], [], [], []
    patient = 0
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    while len(rows) < n:
        patient += 1
        age, sex = int(rng.integers(18, 95)), str(rng.choice(["M", "F"]))
        for follow_up in range(min(int(rng.integers(1, 4)), n - len(rows))):
            name = f"{patient:08d}_{follow_up:03d}.png"
            case = sample_case(rng)
            labels = "|".join(case) if case else "No Finding"
            view = "PA" if rng.random() < 0.6 else "AP"
            rows.append([name, labels, follow_up, patient, age, sex, view, image_size,
                         image_size, 0.143, 0.143])  # fmt: skip
            (test if _is_test_patient(patient, seed) else train_val).append(name)
            drawing = draw(case, image_size, rng)
            Image.fromarray(drawing.image, mode="L").save(folder / name, compress_level=1)
            description, explanation = report_texts(case)
            reports.append({"image": name, "description": description, "explanation": explanation,
                            "case": case, "placement": drawing.placement,
                            "mask": {"frame": [image_size, image_size],
                                     "rle": encode_rle(drawing.mask)}})  # fmt: skip
            bar.update()
    bar.close()
    write_release_tables(root, rows, train_val, test)
    with open(root / "reports.jsonl", "w", encoding="utf-8") as f:
        for report in reports:
            f.write(json.dumps(report, sort_keys=True) + "\n")
    return root


def build_learnable(out: Path, n: int, seed: int, options: Any) -> Any:
    """Write the release under ``out/_raw`` and build it with the `learnable` pipeline, whose
    card says the data is synthetic."""
    import shutil

    from ..build.engine import build
    from .pipelines import learnable_pipeline

    root = out / "_raw"
    if not (options.resume and root.is_dir()):  # --resume reads the release it began with
        shutil.rmtree(root, ignore_errors=True)
        write_learnable_release(root, n=n, seed=seed, progress=options.progress)
    return build(learnable_pipeline(n, seed), root, out, options)
