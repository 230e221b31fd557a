"""Synthetic frontal chest radiographs: realistic enough to compress and resize like real ones.

Used by the demo release and the benchmarks. The anatomy is schematic (body, lungs, heart,
spine, ribs, film noise); a few findings leave a visible sign (a large heart, a blunted base,
a nodule) so images differ with their labels.
"""

from __future__ import annotations

import numpy as np


def synthetic_radiograph(
    size: int | tuple[int, int], findings: set[str], rng: np.random.Generator
) -> np.ndarray:
    """A grey uint8 image (height, width) of a schematic PA chest radiograph."""
    width, height = (size, size) if isinstance(size, int) else size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (x - width / 2) / (width / 2)  # -1 .. 1, patient's right on the image left
    v = (y - height / 2) / (height / 2)
    shift = rng.normal(0, 0.03, 2)

    image = np.full((height, width), 0.08, np.float32)
    body = ((u - shift[0]) / 0.92) ** 2 + ((v - shift[1] - 0.1) / 1.1) ** 2 < 1
    image[body] = 0.55
    for side in (-1, 1):  # lungs: dark, with soft edges
        lung = ((u - side * 0.38 - shift[0]) / 0.3) ** 2 + ((v + 0.05 - shift[1]) / 0.62) ** 2
        image -= 0.35 * np.clip(1.2 - lung, 0, 1)
    ribs = 0.06 * np.clip(np.sin((v * 9 + 0.8 * u**2) * np.pi), 0, 1) ** 4
    image += ribs * (np.abs(u) < 0.75)
    heart_scale = 0.34 if "Cardiomegaly" in findings else 0.24
    heart = ((u + 0.08 - shift[0]) / heart_scale) ** 2 + ((v - 0.28 - shift[1]) / 0.25) ** 2
    image += 0.35 * np.clip(1.3 - heart, 0, 1)
    image += 0.3 * np.exp(-(((u - shift[0]) / 0.07) ** 2))  # spine and mediastinum
    if "Effusion" in findings or "Pleural Effusion" in findings:
        side = rng.choice([-1, 1])
        image += 0.3 * ((v > 0.35) & (np.sign(u) == side) & (np.abs(u) < 0.7))
    if {"Nodule", "Mass"} & findings:
        cx, cy = rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.3)
        radius = 0.05 if "Nodule" in findings else 0.12
        image += 0.3 * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / radius**2)
    if {"Infiltration", "Consolidation", "Pneumonia"} & findings:
        cx, cy = rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.4)
        image += 0.18 * np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / 0.08)
    image += rng.normal(0, 0.025, image.shape).astype(np.float32)  # film/detector noise
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)
