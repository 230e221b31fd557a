"""MIDRC releases: RICORD-1c as downloaded from TCIA, and MIDRC Data Commons (Gen3) downloads.

One item per DICOM image. `series` holds what both share (header texts, identifiers without
PHI, patient splits, reading image bytes from files and zips); `ricord` and `commons` each read
one layout and its labels.
"""

from .commons import MidrcCommonsSource
from .ricord import MidrcRicordSource

__all__ = ["MidrcCommonsSource", "MidrcRicordSource"]
