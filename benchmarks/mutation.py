"""Mutation testing of the core modules with mutmut: do the tests notice when the code changes?

For each module, the sources, tests and data folders are copied into a temporary folder (never
the repository: mutmut writes its `mutants/` tree and reads its configuration in the folder it
runs in, so the configuration is written there as a `setup.cfg`, and the repository's
`setup.cfg`/`pyproject.toml` are never touched; the folder is deleted afterwards unless
`--keep`). mutmut then generates every mutant of that one file and runs the module's fast
tests against each, one child process at a time (`--max-children 1`: the machine is shared).
With `--slow`, every survivor not reviewed as equivalent is then run against the module's slow
tests in turn (for the loss: the rank-split property test and `test_loss_distributed.py`,
which start real gloo process groups), with `MUTANT_UNDER_TEST` set as mutmut's own runner does.

Printed per module: mutants, killed, survived, timeout (and the rarer statuses), the survivors
reviewed as equivalent or device-only, the score (killed or timed out / mutants that are not
equivalent) and the diff of every surviving mutant, tagged with the review's reason where it
has one (`LOSS_EQUIVALENT`, `LOSS_DEVICE_ONLY`, `DICOM_EQUIVALENT` below).

    python benchmarks/mutation.py --module loss --slow      # about 30 min on one core
    python benchmarks/mutation.py --module dicom            # about 10 min on one core
    python benchmarks/mutation.py --module dicom --exclude-tests test_mutants_   # baseline
    python benchmarks/mutation.py --module loss --keep      # keep the work folder (mutmut browse)

Not run in CI. Needs the `dev` extra (mutmut 3.8.1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("mgll_data", "mgll_train", "schemas", "pipelines", "tests")


@dataclass(frozen=True)
class Target:
    """One module to mutate and the tests that cover it."""

    path: str
    tests: tuple[str, ...]
    slow: tuple[str, ...] = ()  # run in turn against the fast selection's survivors (--slow)
    deselect: tuple[str, ...] = ()  # slow tests inside a fast file: moved to the slow phase
    equivalent: dict[str, tuple[str, str]] = field(default_factory=dict)
    device_only: dict[str, tuple[str, str]] = field(default_factory=dict)


# Reviewed survivors: mutant name -> (a piece of the line its diff adds, the reason). An entry
# only applies while the mutant's diff still adds that text, so edits to a module cannot keep
# stale entries alive. EQUIVALENT: no behaviour can tell the mutant from the original.
# DEVICE_ONLY: the mutant only leaves a tensor on the default device; nothing can tell on a
# CPU-only machine (tests/test_mutants_loss.py's CUDA test kills them where a GPU exists), so
# they are reported apart from the CPU score.
LOSS_EQUIVALENT: dict[str, tuple[str, str]] = {
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_11": (
        "lab = labels.to(None)",
        "label_cooccurrence casts the labels itself (1/0/-1/NaN: exact in fp32)",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_22": (
        "None,",
        "the key only deduplicates the warning; any unique key does",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_26": (
        '"XXlabelsXX",',
        "the key only deduplicates the warning; any unique key does",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_27": (
        '"LABELS",',
        "the key only deduplicates the warning; any unique key does",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_31": (
        "None,",
        "the key only deduplicates the warning; any unique key does",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_35": (
        '"XXtext_idsXX",',
        "the key only deduplicates the warning; any unique key does",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_36": (
        '"TEXT_IDS",',
        "the key only deduplicates the warning; any unique key does",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_52": (
        "ids = text_ids[gi].to(None)",
        "text ids are already on the features' device: .to(None) is a no-op",
    ),
    "mgll_train.losses.common.x_global_logits__mutmut_4": (
        "labels = inputs.labels if (with_targets) or True else No",
        "only ClipLoss asks for no targets, and it never reads them",
    ),
    "mgll_train.losses.common.x_global_logits__mutmut_7": (
        "xt_ids = inputs.text_ids if (with_targets) or True else",
        "only ClipLoss asks for no targets, and it never reads them",
    ),
    "mgll_train.losses.common.x_global_logits__mutmut_8": (
        "if world_size >= 1:",
        "gather_features returns its inputs unchanged for world_size 1",
    ),
    "mgll_train.losses.common.x_global_logits__mutmut_37": (
        "ale = inputs.logit_scale.to(None)",
        "a 0-dim scale does not promote: same dtype, same product",
    ),
    "mgll_train.losses.mgll.x_smooth_kl__mutmut_18": (
        ")",
        "sum() of 0-dim tensors from the int 0 equals the sum from a zero tensor",
    ),
    "mgll_train.losses.mgll.x_soft_contrastive__mutmut_12": (
        "g_softmax(-1)).sum(-1).mean(None)",
        "the [G] CE is summed over G later: G x its mean over G and rows is that sum",
    ),
    "mgll_train.losses.mgll.x_soft_contrastive__mutmut_24": (
        "g_softmax(-1)).sum(-1).mean(None)",
        "the [G] CE is summed over G later: G x its mean over G and rows is that sum",
    ),
    "mgll_train.losses.mgll.x_soft_contrastive__mutmut_20": (
        "g_softmax(-1)).sum(-1).mean(+1)",
        "on the 2-D [G, R] tensor dim +1 is dim -1",
    ),
    "mgll_train.losses.mgll.x_soft_contrastive__mutmut_32": (
        "g_softmax(-1)).sum(-1).mean(+1)",
        "on the 2-D [G, R] tensor dim +1 is dim -1",
    ),
    "mgll_train.losses.mgll.xǁMGLLLossǁcompute__mutmut_50": (
        "h.i2t, inputs.logit_bias.to(None), c)",
        "a 0-dim bias does not promote: same dtype, same sum",
    ),
    "mgll_train.losses.mgll.xǁMGLLLossǁcompute__mutmut_54": (
        "l = smooth_kl(batch.i2t) if (inputs.granularities > 1) o",
        "for G = 1 the KL of a distribution with itself is exactly 0",
    ),
    "mgll_train.losses.mgll.xǁMGLLLossǁcompute__mutmut_56": (
        "t) if inputs.granularities >= 1 else zero",
        "for G = 1 the KL of a distribution with itself is exactly 0",
    ),
}
LOSS_DEVICE_ONLY: dict[str, tuple[str, str]] = {
    "mgll_train.losses.common.x_set_diagonal_one__mutmut_6": (
        "= torch.arange(rows, device=None)",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_set_diagonal_one__mutmut_8": (
        "idx = torch.arange(rows, )",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_45": (
        "nd(torch.zeros(r, n, device=None, dtype=dtype))",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_cooccurrence_targets__mutmut_49": (
        "t.append(torch.zeros(r, n, dtype=dtype))",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_49": (
        "device = None",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_65": (
        "_tensor(logit_scale, device=None),",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_67": (
        "orch.as_tensor(logit_scale, ),",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_72": (
        "s_tensor(logit_bias, device=None),",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_74": (
        "torch.as_tensor(logit_bias, ),",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_78": (
        "bels is None else labels.to(None),",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.common.x_prepare_inputs__mutmut_82": (
        "ds is None else text_ids.to(None),",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
    "mgll_train.losses.mgll.xǁMGLLLossǁcompute__mutmut_22": (
        "None,",
        "a tensor left on the default device: on a CPU-only machine the same",
    ),
}
DICOM_EQUIVALENT: dict[str, tuple[str, str]] = {
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_36": (
        'tr(ds.get("VOILUTFunction", None) or "LINEAR").strip().u',
        "an absent VOILUTFunction (None, '', 'XXXX') still ends as LINEAR",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_38": (
        'tr(ds.get("VOILUTFunction", ) or "LINEAR").strip().upper',
        "an absent VOILUTFunction (None, '', 'XXXX') still ends as LINEAR",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_42": (
        'r(ds.get("VOILUTFunction", "XXXX") or "LINEAR").strip().',
        "an absent VOILUTFunction (None, '', 'XXXX') still ends as LINEAR",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_43": (
        't("VOILUTFunction", "") or "XXLINEARXX").strip().upper()',
        "the default spelled so is upper-cased or unknown: LINEAR either way",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_44": (
        't("VOILUTFunction", "") or "linear").strip().upper()',
        "the default spelled so is upper-cased or unknown: LINEAR either way",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_46": (
        'if function not in ("XXLINEARXX", "LINEAR_EXACT", "SIGMO',
        "LINEAR missing from the known names is replaced by LINEAR",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_47": (
        'if function not in ("linear", "LINEAR_EXACT", "SIGMOID")',
        "LINEAR missing from the known names is replaced by LINEAR",
    ),
    "mgll_data.imaging.dicom.x__apply_voi__mutmut_54": (
        'function = "linear"  # PS3.3: LINEAR is the default; unk',
        "window() treats 'linear' as LINEAR; .lower() names the branch alike",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_12": (
        "= np.clip(np.rint(values), None, first + entries - 1).a",
        "pydicom's apply_voi maps inputs below the first entry to entry 0",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_22": (
        "ly_voi(index, ds, 0).astype(None)",
        "numpy's astype(None) / dtype=None is float64, as asked",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_28": (
        "pped = apply_voi(index, ds, ).astype(np.float64)",
        "apply_voi's index defaults to 0",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_33": (
        "rst, first + entries, dtype=None)",
        "np.arange of Python ints is int64",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_34": (
        "domain = np.arange(first + entries, dtype=np.int64)",
        "inputs below the first entry map to entry 0: same min and max",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_36": (
        "nge(first, first + entries, )",
        "np.arange of Python ints is int64",
    ),
    "mgll_data.imaging.dicom.x__apply_voi_lut__mutmut_44": (
        "ble = apply_voi(domain, ds, )",
        "apply_voi's index defaults to 0",
    ),
    "mgll_data.imaging.dicom.x__clean_unused_bits__mutmut_20": (
        "if stored <= 0 or stored > bits:",
        "BitsStored == bits: the mask is all ones, the shift 0",
    ),
    "mgll_data.imaging.dicom.x__clean_unused_bits__mutmut_32": (
        "ay((1 << stored) - 1, dtype=None)",
        "numpy 1.26 casts the 0-d mask to the array's dtype",
    ),
    "mgll_data.imaging.dicom.x__clean_unused_bits__mutmut_34": (
        "np.array((1 << stored) - 1, )",
        "numpy 1.26 casts the 0-d mask to the array's dtype",
    ),
    "mgll_data.imaging.dicom.x__clean_unused_bits__mutmut_43": (
        '(f"i{arr.dtype.itemsize}"), )',
        "a copy holds the same values",
    ),
    "mgll_data.imaging.dicom.x__clean_unused_bits__mutmut_45": (
        'arr.dtype.itemsize}"), copy=True)',
        "a copy holds the same values",
    ),
    "mgll_data.imaging.dicom.x__colour_to_uint8__mutmut_18": (
        "max(), (1 << stored) - 1 if (stored < 64) or True else a",
        "differs only for BitsStored >= 64; colour samples have 8 or 16 bits",
    ),
    "mgll_data.imaging.dicom.x__colour_to_uint8__mutmut_23": (
        "1 << stored) - 1 if stored <= 64 else arr.max()))",
        "differs only for BitsStored >= 64; colour samples have 8 or 16 bits",
    ),
    "mgll_data.imaging.dicom.x__colour_to_uint8__mutmut_24": (
        "<< stored) - 1 if stored < 65 else arr.max()))",
        "differs only for BitsStored >= 64; colour samples have 8 or 16 bits",
    ),
    "mgll_data.imaging.dicom.x__colour_to_uint8__mutmut_29": (
        "lip(arr.astype(np.float64), None, high) * (255.0 / high)",
        "colour samples are unsigned: nothing below 0 to clip",
    ),
    "mgll_data.imaging.dicom.x__colour_to_uint8__mutmut_30": (
        "(arr.astype(np.float64), 0, None) * (255.0 / high)).asty",
        "high is at least every sample: nothing above it to clip",
    ),
    "mgll_data.imaging.dicom.x__colour_to_uint8__mutmut_34": (
        "np.rint(np.clip(arr.astype(None), 0, high) * (255.0 / h",
        "numpy's astype(None) / dtype=None is float64, as asked",
    ),
    "mgll_data.imaging.dicom.x__first__mutmut_1": (
        'if value is None and value == "":',
        "'' then fails float() and gives None all the same",
    ),
    "mgll_data.imaging.dicom.x__first__mutmut_4": (
        'value is None or value == "XXXX":',
        "'' then fails float() and gives None all the same",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_7": (
        "np.percentile(sample.astype(None), _PERCENTILES))",
        "numpy's astype(None) / dtype=None is float64, as asked",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_15": (
        "turn np.zeros(values.shape, None)",
        "np.zeros is float64 by default",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_17": (
        "turn np.zeros(values.shape, )",
        "np.zeros is float64 by default",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_19": (
        "t64) - low) / (high - low), None, 1.0)",
        "dataset_to_image clips to [0, 1] after VOI and inversion",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_20": (
        "- low) / (high - low), 0.0, None)",
        "dataset_to_image clips to [0, 1] after VOI and inversion",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_26": (
        "turn np.clip((values.astype(None) - low) / (high - low),",
        "numpy's astype(None) / dtype=None is float64, as asked",
    ),
    "mgll_data.imaging.dicom.x__percentile_range__mutmut_29": (
        "- low) / (high - low), 0.0, 2.0)",
        "dataset_to_image clips to [0, 1] after VOI and inversion",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_7": (
        'PhotometricInterpretation", None)).strip().upper()',
        "pixel_array refuses a dataset without Photometric Interpretation",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_9": (
        'PhotometricInterpretation", )).strip().upper()',
        "pixel_array refuses a dataset without Photometric Interpretation",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_13": (
        'hotometricInterpretation", "XXXX")).strip().upper()',
        "pixel_array refuses a dataset without Photometric Interpretation",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_46": (
        'if arr.ndim == 4 and arr.shape[-1] != 3 and int(ds.get("',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_47": (
        'arr.ndim == 3 and arr.shape[+1] != 3 and int(ds.get("Sam',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_48": (
        'rr.ndim == 3 and arr.shape[-2] != 3 and int(ds.get("Samp',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_49": (
        'ndim == 3 and arr.shape[-1] == 3 and int(ds.get("Samples',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_50": (
        'm == 3 and arr.shape[-1] != 4 and int(ds.get("SamplesPer',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_51": (
        "arr.shape[-1] != 3 and int(None) == 1:",
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_52": (
        "ape[-1] != 3 and int(ds.get(None, 1)) == 1:",
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_53": (
        't(ds.get("SamplesPerPixel", None)) == 1:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_54": (
        "ape[-1] != 3 and int(ds.get(1)) == 1:",
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_55": (
        't(ds.get("SamplesPerPixel", )) == 1:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_56": (
        'pe[-1] != 3 and int(ds.get("XXSamplesPerPixelXX", 1)) ==',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_57": (
        'pe[-1] != 3 and int(ds.get("samplesperpixel", 1)) == 1:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_58": (
        'e[-1] != 3 and int(ds.get("SAMPLESPERPIXEL", 1)) == 1:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_59": (
        't(ds.get("SamplesPerPixel", 2)) == 1:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_60": (
        '.get("SamplesPerPixel", 1)) != 1:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_61": (
        't("SamplesPerPixel", 1)) == 2:',
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_62": (
        "arr = None  # a decoder that ignored `index`",
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_63": (
        "arr = arr[1]  # a decoder that ignored `index`",
        "pydicom 3's pixel_array(index=0) returns one frame: never 3-D grey",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_64": (
        'colour_bits = ""',
        "'' and None are both falsy: BitsStored is used",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_89": (
        "our layout {photometric or 'XXunknownXX'}\")",
        "an empty Photometric Interpretation never decodes",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_90": (
        "our layout {photometric or 'UNKNOWN'}\")",
        "an empty Photometric Interpretation never decodes",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_101": (
        "arr, ds, colour_bits), mode=None), conversion",
        "Pillow infers RGB from (H, W, 3) uint8",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_103": (
        "int8(arr, ds, colour_bits), ), conversion",
        "Pillow infers RGB from (H, W, 3) uint8",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_132": (
        'get("PresentationLUTShape", None)).strip().upper()',
        "an absent PresentationLUTShape read as None/'XXXX' is not INVERSE",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_134": (
        'get("PresentationLUTShape", )).strip().upper()',
        "an absent PresentationLUTShape read as None/'XXXX' is not INVERSE",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_138": (
        'et("PresentationLUTShape", "XXXX")).strip().upper()',
        "an absent PresentationLUTShape read as None/'XXXX' is not INVERSE",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_156": (
        "if np.issubdtype(None, np.integer) and arr.dtype.itemsiz",
        "the per-pixel path gives the table path's pixels (only speed differs)",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_157": (
        "if np.issubdtype(arr.dtype, None) and arr.dtype.itemsize",
        "the per-pixel path gives the table path's pixels (only speed differs)",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_160": (
        "er) and arr.dtype.itemsize < 2:",
        "the per-pixel path gives the table path's pixels (only speed differs)",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_161": (
        ") and arr.dtype.itemsize <= 3:",
        "the per-pixel path gives the table path's pixels (only speed differs)",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_167": (
        "r.astype(np.int32) - low if (low) or True else arr",
        "unsigned data: low is 0, the index is the stored value",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_173": (
        "(arr.dtype).max) + 1, dtype=None)",
        "np.arange of Python ints is int64",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_176": (
        ".iinfo(arr.dtype).max) + 1, )",
        "np.arange of Python ints is int64",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_180": (
        "(np.iinfo(arr.dtype).max) + 2, dtype=np.int64)",
        "one more table entry, never indexed",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_238": (
        "out = np.rint(np.clip(grey, None, 1.0) * 255.0).astype(n",
        "every VOI branch already returns values in [0, 1]",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_239": (
        "np.rint(np.clip(grey, 0.0, None) * 255.0).astype(np.uin",
        "every VOI branch already returns values in [0, 1]",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_244": (
        "np.rint(np.clip(grey, 0.0, 2.0) * 255.0).astype(np.uint",
        "every VOI branch already returns values in [0, 1]",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_249": (
        "n Image.fromarray(out, mode=None), conversion",
        "Pillow infers L from 2-D uint8",
    ),
    "mgll_data.imaging.dicom.x_dataset_to_image__mutmut_251": (
        "return Image.fromarray(out, ), conversion",
        "Pillow infers L from 2-D uint8",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_6": (
        't("PresentationIntentType", None) or "").strip().upper()',
        "an absent intent read as None/'XXXX' is not FOR PROCESSING",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_8": (
        't("PresentationIntentType", ) or "").strip().upper()',
        "an absent intent read as None/'XXXX' is not FOR PROCESSING",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_12": (
        '("PresentationIntentType", "XXXX") or "").strip().upper(',
        "an absent intent read as None/'XXXX' is not FOR PROCESSING",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_13": (
        'ntationIntentType", "") or "XXXX").strip().upper()',
        "an absent intent read as None/'XXXX' is not FOR PROCESSING",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_20": (
        'r str(ds.get("SOPClassUID", None)) in _FOR_PROCESSING_CL',
        "an absent SOP class read as None/'XXXX' is no For-Processing class",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_22": (
        'r str(ds.get("SOPClassUID", )) in _FOR_PROCESSING_CLASSE',
        "an absent SOP class read as None/'XXXX' is no For-Processing class",
    ),
    "mgll_data.imaging.dicom.x_is_for_processing__mutmut_26": (
        'str(ds.get("SOPClassUID", "XXXX")) in _FOR_PROCESSING_C',
        "an absent SOP class read as None/'XXXX' is no For-Processing class",
    ),
    "mgll_data.imaging.dicom.x_read_dataset__mutmut_31": (
        "pydicom.dcmread(io.BytesIO(None))",
        "dcmread fails on no bytes; the force=True retry reads the same file",
    ),
    "mgll_data.imaging.dicom.x_window__mutmut_1": (
        'th: float, function: str = "XXLINEARXX"):',
        "unknown or lower-case names take the LINEAR branch",
    ),
    "mgll_data.imaging.dicom.x_window__mutmut_2": (
        'th: float, function: str = "linear"):',
        "unknown or lower-case names take the LINEAR branch",
    ),
    "mgll_data.imaging.dicom.x_window__mutmut_4": (
        "x = values.astype(None, copy=False)",
        "numpy's astype(None) / dtype=None is float64, as asked",
    ),
    "mgll_data.imaging.dicom.x_window__mutmut_7": (
        "= values.astype(np.float64, )",
        "a copy holds the same values",
    ),
    "mgll_data.imaging.dicom.x_window__mutmut_8": (
        "ues.astype(np.float64, copy=True)",
        "a copy holds the same values",
    ),
    "mgll_data.imaging.dicom.x_window__mutmut_45": (
        "n (x > center - 0.5).astype(None)",
        "numpy's astype(None) / dtype=None is float64, as asked",
    ),
}

_RANK_SPLIT = "tests/test_properties.py::test_loss_is_equal_across_a_split_into_ranks"
_LOSS_TESTS = ("tests/test_loss.py", "tests/test_properties.py", "tests/test_mutants_loss.py")


def _loss_target(path: str) -> Target:
    """One module of mgll_train/losses/ with the loss tests (fast) and the rank tests (slow)."""
    return Target(
        path=path,
        tests=_LOSS_TESTS,
        slow=(_RANK_SPLIT, "tests/test_loss_distributed.py"),
        deselect=(_RANK_SPLIT,),
        equivalent=LOSS_EQUIVALENT,
        device_only=LOSS_DEVICE_ONLY,
    )


# The loss objectives live in mgll_train/losses/, one module each plus the shared parts; every
# one is a target with the same tests ("loss" is the MGLL objective itself).
TARGETS = {
    "loss": _loss_target("mgll_train/losses/mgll.py"),
    "loss-common": _loss_target("mgll_train/losses/common.py"),
    "loss-clip": _loss_target("mgll_train/losses/clip.py"),
    "loss-official": _loss_target("mgll_train/losses/official.py"),
    "loss-base": _loss_target("mgll_train/losses/base.py"),
    "dicom": Target(
        path="mgll_data/imaging/dicom.py",
        tests=(
            "tests/test_dicom.py",
            "tests/test_dicom_variants.py",
            "tests/test_mutants_dicom.py",
        ),
        equivalent=DICOM_EQUIVALENT,
    ),
    "labeler": Target(path="mgll_data/text/labeler.py", tests=("tests/test_labeler.py",)),
    "engine": Target(path="mgll_data/build/engine.py", tests=("tests/test_stages.py",)),
    "data": Target(path="mgll_train/data/records.py", tests=("tests/test_train_data.py",)),
}


def _env() -> dict[str, str]:
    """One thread per process (the machine is shared), offline Hugging Face libraries."""
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONDONTWRITEBYTECODE="1",
    )


def _pyproject_without_mutmut(text: str) -> str:
    """The repository's pyproject.toml (pytest settings) minus any [tool.mutmut] table, which
    mutmut would read instead of the setup.cfg written here."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
        if header:
            skipping = header.group(1).strip().startswith("tool.mutmut")
        if not skipping:
            out.append(line)
    return "".join(out)


def _setup_cfg(target: Target, tests: list[str]) -> str:
    def block(values: list[str]) -> str:
        return "".join(f"\n    {v}" for v in values)

    selection = tests + [f"--deselect={d}" for d in target.deselect]
    return (
        "[mutmut]\n"
        f"source_paths ={block(['mgll_data', 'mgll_train'])}\n"
        f"only_mutate = {target.path}\n"
        f"also_copy ={block(['schemas', 'pipelines'])}\n"
        f"pytest_add_cli_args_test_selection ={block(selection)}\n"
        f"pytest_add_cli_args ={block(['-p', 'no:cacheprovider', '-W', 'ignore'])}\n"
        "use_git_change_detection = false\n"
        "timeout_multiplier = 5.0\n"
    )


def _selected(paths: tuple[str, ...], exclude: list[str]) -> list[str]:
    """The test paths (or node ids) whose file exists and whose path matches no `exclude`."""
    return [
        t for t in paths if (REPO / t.split("::")[0]).is_file() and not any(e in t for e in exclude)
    ]


def prepare(workdir: Path, target: Target, tests: list[str]) -> None:
    """Copy sources, tests and data into `workdir` and write mutmut's configuration there."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in COPIED:
        shutil.copytree(REPO / name, workdir / name, ignore=ignore)
    pyproject = (REPO / "pyproject.toml").read_text("utf-8")
    (workdir / "pyproject.toml").write_text(_pyproject_without_mutmut(pyproject), "utf-8")
    (workdir / "setup.cfg").write_text(_setup_cfg(target, tests), "utf-8")


def _mutmut(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run(
        [str(exe), *args], cwd=workdir, env=_env(), capture_output=True, text=True
    )


def statuses(workdir: Path, target: Target) -> dict[str, str]:
    """Every mutant's status, read from mutmut's metadata file of the module."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((workdir / "mutants" / f"{target.path}.meta").read_text("utf-8"))
    return {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}


_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
path, names = sys.argv[1], sys.argv[2:]
print(json.dumps({n: get_diff_for_mutant(n, path=path) for n in names}))
"""


def diffs_of(workdir: Path, target: Target, names: list[str]) -> dict[str, str]:
    """The unified diffs of `names` (one interpreter for all of them)."""
    if not names:
        return {}
    proc = subprocess.run(
        [sys.executable, "-c", _DIFFS, target.path, *names],
        cwd=workdir,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def run_slow(workdir: Path, tests: list[str], name: str, timeout_s: float) -> str:
    """Run the slow tests in turn with one mutant active: "killed", "survived" or "timeout".

    Each run is its own process group, killed whole on timeout (a mutant can leave spawned
    ranks waiting in a collective for ever)."""
    env = dict(_env(), MUTANT_UNDER_TEST=name)
    for test in tests:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test]
        proc = subprocess.Popen(
            cmd,
            cwd=workdir / "mutants",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timeout"
        finally:
            try:  # leftovers of a finished run (orphaned ranks) go too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.returncode == 1:
            return "killed"
        if proc.returncode != 0:
            text = out.decode(errors="replace")[-3000:]
            raise RuntimeError(f"slow test {test} could not run with {name}:\n{text}")
    return "survived"


def _reviewed(table: dict[str, tuple[str, str]], name: str, diff: str) -> bool:
    if name not in table:
        return False
    added = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("++")]
    return any(table[name][0] in line for line in added)


def mutate(name: str, target: Target, args: argparse.Namespace) -> dict[str, object]:
    """Run mutmut on one target; print and return its counts."""
    root = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"mgll-mutation-{name}-", dir=root))
    tests = _selected(target.tests, args.exclude_tests)
    slow = _selected(target.slow, args.exclude_tests) if args.slow else []
    try:
        prepare(workdir, target, tests)
        print(f"== {name}: {target.path}  (work folder {workdir})", flush=True)
        print(f"   fast tests: {' '.join(tests)}", flush=True)
        start = time.monotonic()
        proc = _mutmut(workdir, "run", "--max-children", str(args.max_children))
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:])
            raise SystemExit(f"mutmut run failed for {name} (exit {proc.returncode})")
        status = statuses(workdir, target)
        print(f"   mutmut run: {time.monotonic() - start:.0f} s", flush=True)
        survivors = sorted((n for n, s in status.items() if s == "survived"), key=_natural)
        diffs = diffs_of(workdir, target, survivors)
        equivalent = {n for n in survivors if _reviewed(target.equivalent, n, diffs[n])}
        device_only = {n for n in survivors if _reviewed(target.device_only, n, diffs[n])}
        if slow and survivors:
            if run_slow(workdir, slow, "fail", args.slow_timeout) != "killed":
                raise SystemExit("the slow tests do not fail with MUTANT_UNDER_TEST=fail")
            checked = [n for n in survivors if n not in equivalent | device_only]
            print(f"   slow tests on {len(checked)} survivors: {' '.join(slow)}", flush=True)
            start = time.monotonic()
            for n in checked:
                verdict = run_slow(workdir, slow, n, args.slow_timeout)
                print(f"     {verdict:<9} {n}", flush=True)
                if verdict != "survived":
                    status[n] = f"{verdict} (slow)"
            print(f"   slow phase: {time.monotonic() - start:.0f} s")
            survivors = [n for n in survivors if status[n] == "survived"]
        counts: dict[str, int] = {}
        for s in status.values():
            counts[s] = counts.get(s, 0) + 1
        total = len(status)
        detected = sum(v for k, v in counts.items() if k.startswith(("killed", "timeout")))
        meaningful = total - len(equivalent) - len(device_only)
        rate = 100.0 * detected / meaningful if meaningful else 100.0
        print(f"   mutants {total}")
        for key in sorted(counts):
            print(f"   {key:<16} {counts[key]}")
        print(f"   of the survivors: equivalent {len(equivalent)}, device-only {len(device_only)}")
        print(
            f"   detected (killed or timeout) {detected} of {meaningful} non-equivalent "
            f"mutants: {rate:.1f} %"
        )
        with_device = 100.0 * detected / (meaningful + len(device_only)) if total else 100.0
        if device_only:
            print(f"   counting the device-only ones as survivors: {with_device:.1f} %")
        for n in survivors:
            if n in equivalent:
                tag = f"equivalent: {target.equivalent[n][1]}"
            elif n in device_only:
                tag = f"device-only: {target.device_only[n][1]}"
            else:
                tag = "SURVIVED"
            print(f"\n--- {n}  [{tag}]\n{diffs[n].rstrip()}")
        if args.keep:
            print(f"\n   kept {workdir}")
        print(flush=True)
        return {
            "module": name,
            "total": total,
            "counts": counts,
            "equivalent": len(equivalent),
            "device_only": len(device_only),
            "score_percent": round(rate, 2),
            "surviving": [n for n in survivors if n not in equivalent | device_only],
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _natural(name: str) -> tuple[str, int]:
    head, _, number = name.rpartition("_")
    return (head, int(number) if number.isdigit() else -1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        choices=sorted(TARGETS),
        help="module(s) to mutate (default: loss and dicom)",
    )
    parser.add_argument("--max-children", type=int, default=1, help="mutmut workers (1)")
    parser.add_argument("--slow", action="store_true", help="run survivors against slow tests")
    parser.add_argument("--slow-timeout", type=float, default=300.0, help="per test (300 s)")
    parser.add_argument(
        "--exclude-tests",
        action="append",
        default=[],
        metavar="TEXT",
        help="leave out tests whose path contains TEXT (e.g. test_mutants_ for a baseline)",
    )
    parser.add_argument("--workdir", help="parent of the work folders (the system temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folders")
    parser.add_argument("--json", help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    results = [mutate(n, TARGETS[n], args) for n in (args.module or ["loss", "dicom"])]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
