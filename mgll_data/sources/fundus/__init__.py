"""Fundus releases: ODIR-5K, RFMiD, and the graded releases APTOS 2019, EyePACS, IDRiD, Messidor-2.

Every reader yields one RawItem per fundus photograph (modality `OP`, RGB kept by the image
stage). Labels follow the `fundus` vocabulary: `Normal` or `Abnormal` is always asserted, so the
shared category formatter gives `Normal` or `Abnormal, <diseases>` (MGLL's wording). Labels are
what the release asserts, never propagated up the hierarchy.

- `odir`: ODIR-5K, per-eye labels from the diagnostic keywords.
- `rfmid`: RFMiD 1.0, the 45 condition columns of its three official splits.
- `graded`: one reader for the releases that grade diabetic retinopathy (and macular edema),
  configured by the pipeline's `release` section.
"""

from .graded import GradedSource
from .odir import OdirSource
from .rfmid import RfmidSource

__all__ = ["GradedSource", "OdirSource", "RfmidSource"]
