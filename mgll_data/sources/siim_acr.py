"""SIIM-ACR Pneumothorax Segmentation: `dicom-images-train/<study>/<series>/<SOPInstanceUID>.dcm`
and `train-rle.csv` (`ImageId, EncodedPixels`, with the space).

Each CSV row is one pneumothorax region of an image in SIIM's relative run-length code on the
1024 x 1024 frame (`imaging/masks.py`, `parse_siim_rle`), or `-1` for an image without one; an
image with several regions has several rows. Pneumothorax is 1 when any row has a region, else 0,
and the mask is the union of the regions. A row whose code cannot be read quarantines its image
with a reason naming the line. Splits: a salted hash of the image id (the SOPInstanceUID): the
release's de-identified PatientID is read only from each DICOM, which a scan does not open.
"""

from __future__ import annotations

from ..imaging.masks import MaskSpec, parse_siim_rle
from .kaggle_dicom import Annotation, KaggleDicomSource, Rows

ID_COLUMN, RLE_COLUMN = "ImageId", "EncodedPixels"


class SiimAcrSource(KaggleDicomSource):
    """Reads the SIIM-ACR training release: DICOMs anywhere under the root, `train-rle.csv`."""

    TABLE_NAMES = ("train-rle.csv", "stage_1_train-rle.csv")
    TABLE_COLUMNS = (ID_COLUMN, RLE_COLUMN)
    RELEASE = "SIIM-ACR Pneumothorax"

    def annotate(self, rows: Rows) -> Annotation | str:
        runs: list[tuple[int, int]] = []
        for line, row in rows:
            try:
                runs.extend(parse_siim_rle(row[RLE_COLUMN], self.frame))
            except ValueError as err:
                return f"unreadable run-length code ({self.where(line)}: {err})"
        labels = {self.label_map[RLE_COLUMN]: 1.0 if runs else 0.0}
        return Annotation(labels, MaskSpec(frame=self.frame, runs=tuple(runs)))
