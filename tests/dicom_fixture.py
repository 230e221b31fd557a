"""Generated DX/CR DICOM files shaped like MIMIC-CXR's (12-bit in 16, Explicit VR Little Endian)."""

from __future__ import annotations

import io
import warnings
from copy import deepcopy

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

# Identifying values planted in every generated file; none may reach a record.
PHI = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "PID98765432",
    "PatientBirthDate": "19430917",
    "AccessionNumber": "ACC24681357",
    "StudyDate": "21870605",
    "SeriesDate": "21870606",
    "ContentDate": "21870607",
    "StudyTime": "93412.123",
    "InstitutionName": "Saint Nowhere Memorial Hospital",
    "ReferringPhysicianName": "Drfoo^Barbazquux",
    "OtherPatientIDs": "OTHERPID55501",
    "PatientAge": "091Y",
}


def chest(rows: int = 60, cols: int = 48) -> np.ndarray:
    """12-bit 'radiograph' in MONOCHROME2 sense: air dark (low), lungs mid, bone bright (high)."""
    y, x = np.mgrid[0:rows, 0:cols]
    pixels = 600 + (1200 * x) // cols + (500 * y) // rows  # smooth soft-tissue ramp, 600..2300
    pixels[:, : cols // 8] = 100  # air at the left edge
    pixels[rows // 3 : rows // 2, cols // 4 : 3 * cols // 4] = 3800  # a rib: bone
    return pixels.astype(np.uint16)


def make_dx(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    sop_class: str = DX_PRESENTATION,
    phi: bool = True,
    **tags,
) -> Dataset:
    """A DX dataset around `pixels` (uint16), with MIMIC's descriptive tags and planted PHI."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Manufacturer = "Generated"
    ds.StudyDescription = "CHEST (PORTABLE AP)"
    ds.SeriesDescription = "CHEST AP"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.PresentationIntentType = (
        "FOR PROCESSING" if sop_class == DX_PROCESSING else "FOR PRESENTATION"
    )
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10206", "SRT", "AP"
    ds.ViewCodeSequence = Sequence([code])
    if phi:
        with warnings.catch_warnings():  # MIMIC's StudyTime lacks its leading zero: invalid TM
            warnings.simplefilter("ignore")
            for keyword, value in PHI.items():
                setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode(
    ds: Dataset,
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    preamble: bool = True,
    file_meta: bool = True,
) -> bytes:
    """`ds` written in an uncompressed `transfer_syntax` as archives hold DICOM files.

    `preamble=False` drops the 128-byte preamble and the "DICM" prefix but keeps the file meta
    group; `file_meta=False` writes the bare data set (no preamble, no meta group), the way
    pre-Part-10 and some PACS exports store it. `ds.PixelData` must already be in the byte
    order of `transfer_syntax`; `ds` itself is left unchanged.
    """
    syntax = UID(transfer_syntax)
    copy = deepcopy(ds)
    copy.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    if file_meta:
        copy.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        assert data[128:132] == b"DICM"
        return data if preamble else data[132:]
    del copy.file_meta
    copy.save_as(buffer, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian)
    return buffer.getvalue()
