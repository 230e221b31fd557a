"""The DICOM image stage: one CR/DX (or any single-image) DICOM to an 8-bit stored image.

Shared by every DICOM source (MIMIC-CXR, MIDRC). The order follows the DICOM display pipeline
(PS3.3 C.11, PS3.4 N.2), because each step is defined in the output space of the one before:

1. read (`.dcm.gz` gunzipped), refuse For-Processing images (raw detector data, not meant for
   display), decode the first frame through pydicom's plugins (pylibjpeg, gdcm, native RLE);
2. clean unused high bits (BitsStored < BitsAllocated may carry garbage there);
3. Modality LUT: ModalityLUTSequence or RescaleSlope/Intercept -> modality values;
4. VOI: VOILUTSequence if present, else the first WindowCenter/WindowWidth pair with its
   VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID as PS3.3 C.11.2.1.2 defines them), else a
   robust percentile range; windows are given in modality-value space, so this comes after 3;
5. polarity: invert exactly once when the image is MONOCHROME1 *or* its PresentationLUTShape is
   INVERSE (DX For Presentation files carry both for one inversion; flipping twice gives dark
   bones); after VOI, because windows are defined on the stored values, not the displayed ones;
6. 8-bit "L" image, then the raster stage's resize and encoder (`images.py`).

Policies: multi-frame images keep frame 0 only (the extra dict says how many there were);
colour images (RGB, YBR_*, PALETTE COLOR) skip the grey-scale LUTs (the standard applies them
to monochrome data only) and become grey by ITU-R 601 luminance, or stay RGB when the policy
asks for colour. Per-item failures raise `ItemError("image", reason)`, never anything else.
Only whitelisted, non-identifying header fields are returned (no PHI reaches a record).
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ..errors import ItemError
from .raster import (
    EncodedImage,
    ImagePolicy,
    check_pixels,
    normalise_mode,
    resize_and_encode,
)

# Header fields copied into `extra`. Nothing identifying: no names, IDs, accession numbers,
# dates/times, UIDs, institutions, ages or free-text comments. Study/Series descriptions are
# procedure names (MIDRC's texts use them).
WHITELIST = (
    "Modality",
    "ViewPosition",
    "PhotometricInterpretation",
    "PresentationIntentType",
    "PresentationLUTShape",
    "BodyPartExamined",
    "ImageType",
    "Manufacturer",
    "ManufacturerModelName",
    "StudyDescription",
    "SeriesDescription",
    "PatientOrientation",
    "ImageLaterality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)

# SOP classes whose images are raw detector data (DX, mammography, intra-oral For Processing).
_FOR_PROCESSING_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.3.1",
}
_GZIP_MAGIC = b"\x1f\x8b"
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
# No-window fallback: clip to these percentiles of the modality values. Min-max is hostage to a
# handful of pixels (dead/hot detector elements, burned-in markers at full scale, collimator
# edges) and then leaves the anatomy in a few grey levels; the 0.5/99.5 range loses only the
# tails. (MIMIC-CXR-JPG used min-max plus histogram equalisation.)
_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 512  # estimate percentiles on a strided grid of about this many rows
# Room for everything but pixels (header, overlays, icons, private data) in a file's size bound.
_NON_PIXEL_BYTES = 64 * 2**20


def byte_limit(max_pixels: int) -> int:
    """The most bytes a DICOM (after gunzip) within `max_pixels` can need: 4 bytes a sample
    (32-bit or float data; 16-bit and RGB need less) plus room for the rest of the file."""
    return 4 * max_pixels + _NON_PIXEL_BYTES


def process_dicom(
    source: str | Path | bytes | BinaryIO,
    policy: ImagePolicy,
    *,
    skip_for_processing: bool = True,
    voi: str = "auto",
) -> tuple[EncodedImage, dict[str, Any]]:
    """Convert one DICOM file (path, bytes; optionally gzipped) to a stored image.

    `voi` picks the VOI step: "auto" (VOI LUT, else window, else percentiles), "window"
    (prefer the window over a VOI LUT), or "percentile" (ignore the header's VOI). Returns the
    encoded image and the whitelisted header fields plus a `conversion` entry saying which
    branches ran. Rows x Columns x frames is checked against `policy.max_pixels` before any
    pixel is decoded.
    """
    if voi not in ("auto", "window", "percentile"):
        raise ValueError(f"voi must be auto, window or percentile, not {voi!r}")
    ds = read_dataset(source, max_bytes=byte_limit(policy.max_pixels))
    check_dataset_pixels(ds, policy.max_pixels)
    fields = dicom_fields(ds)
    if skip_for_processing and is_for_processing(ds):
        raise ItemError("image", "DICOM is For Processing (raw detector data), skipped")
    try:
        image, conversion = dataset_to_image(ds, voi)
        pixels = normalise_mode(image, policy.color)
    except ItemError:
        raise
    except Exception as err:  # corrupt data surfaces in many types from many decoders
        raise ItemError("image", f"cannot convert DICOM pixels ({_one_line(err)})") from err
    fields["conversion"] = conversion
    encoded = resize_and_encode(pixels, pixels.size, policy)
    return encoded, fields


def check_dataset_pixels(ds: Dataset, limit: int) -> None:
    """Refuse a dataset whose Rows x Columns x NumberOfFrames exceeds `limit` (ItemError).

    Unreadable dimensions are left to the decoder, which says what is wrong with them.
    """
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return
    check_pixels(columns, rows, limit, frames)


def check_deflated_size(data: bytes, max_bytes: int) -> None:
    """Refuse a Deflated Explicit VR file whose data set inflates past `max_bytes` (ItemError),
    inflating at most that much: pydicom would inflate all of it in memory, so a few MB of
    deflated zeros would take gigabytes."""
    if DeflatedExplicitVRLittleEndian.encode() not in data[:4096]:  # the meta group's UID
        return
    try:
        stream = io.BytesIO(data)
        pydicom.filereader.read_preamble(stream, force=True)
        meta = pydicom.filereader._read_file_meta_info(stream)  # no public reader of a stream
    except Exception:  # noqa: BLE001 - an unreadable header is reported by the reader itself
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[stream.tell() :], max_bytes + 1)
    except zlib.error:
        return  # corrupt: the reader says so
    if len(inflated) > max_bytes:
        raise ItemError(
            "image",
            f"deflated DICOM data set inflates past {max_bytes / 1e6:.0f} MB, more than an "
            "image within the pixel limit needs (--max-image-pixels)",
        )


def read_dataset(source: str | Path | bytes | BinaryIO, max_bytes: int | None = None) -> Dataset:
    """Read a DICOM dataset from a path, bytes or a binary file (gzip transparently);
    ItemError if unreadable, or if it (gunzipped) holds more than `max_bytes`."""
    limit = -1 if max_bytes is None else max_bytes + 1
    try:
        if isinstance(source, bytes):
            data = source
        elif hasattr(source, "read"):
            data = source.read(limit)
        else:
            with open(source, "rb") as f:
                data = f.read(limit)
    except FileNotFoundError as err:
        raise ItemError("image", f"missing DICOM file: {source}") from err
    except OSError as err:
        raise ItemError("image", f"cannot read DICOM file ({_one_line(err)})") from err
    if data[:2] == _GZIP_MAGIC:
        try:
            # Read through GzipFile so that a gzip bomb stops at the limit, not at the memory's.
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as unzipped:
                data = unzipped.read(limit)
        except (OSError, EOFError, zlib.error) as err:
            raise ItemError("image", f"corrupt or truncated gzip ({_one_line(err)})") from err
    if max_bytes is not None and len(data) > max_bytes:
        raise ItemError(
            "image",
            f"DICOM holds over {max_bytes / 1e6:.0f} MB, more than an image within the pixel "
            "limit needs (--max-image-pixels)",
        )
    if max_bytes is not None:
        check_deflated_size(data, max_bytes)
    try:
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            # No preamble/DICM prefix: some archives strip it. Garbage still fails below.
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds and not ds.get("FloatPixelData"):
            raise ItemError("image", "not a DICOM image (no pixel data)")
        if "TransferSyntaxUID" not in ds.file_meta:
            # No meta group: the encoding pydicom detected (big endian data sets exist too).
            implicit, little = ds.original_encoding
            if implicit is not False:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            elif little is not False:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            else:
                ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    except ItemError:
        raise
    except Exception as err:  # pydicom raises many types on garbage and truncation
        raise ItemError("image", f"not a readable DICOM file ({_one_line(err)})") from err
    return ds


def is_for_processing(ds: Dataset) -> bool:
    """True for raw detector images (PresentationIntentType or a For-Processing SOP class)."""
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    return intent == "FOR PROCESSING" or str(ds.get("SOPClassUID", "")) in _FOR_PROCESSING_CLASSES


def dicom_fields(ds: Dataset) -> dict[str, Any]:
    """The whitelisted header fields as plain JSON values; absent or empty fields are left out."""
    fields: dict[str, Any] = {}
    for keyword in WHITELIST:
        try:
            value = _plain(ds.get(keyword))
        except Exception:  # a malformed value is simply not copied
            continue
        if value not in (None, "", []):
            fields[keyword] = value
    return fields


def dataset_to_image(ds: Dataset, voi: str = "auto") -> tuple[Image.Image, dict[str, Any]]:
    """Decode frame 0 and run the display pipeline; an 8-bit "L" (or "RGB" for colour) image."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    frames = int(ds.get("NumberOfFrames") or 1)
    conversion: dict[str, Any] = {
        "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
        "frames": frames,
        "frame": 0,
    }
    try:
        arr = pixel_array(ds, index=0)  # decodes frame 0 only; YBR comes back as RGB
    except Exception as err:
        raise ItemError("image", f"cannot decode DICOM pixel data ({_one_line(err)})") from err
    if arr.ndim == 3 and arr.shape[-1] != 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[0]  # a decoder that ignored `index`
    colour_bits = None
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        photometric = "RGB"
        # The colours' range is the LUT entries' depth, not the BitsStored of the indices.
        colour_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    if arr.ndim == 3:
        if photometric not in _COLOUR:
            raise ItemError("image", f"unsupported colour layout {photometric or 'unknown'}")
        conversion.update(colour=photometric, voi="none", inverted=False)
        return Image.fromarray(_colour_to_uint8(arr, ds, colour_bits), mode="RGB"), conversion
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ItemError("image", f"unsupported photometric interpretation {photometric!r}")
    arr = _clean_unused_bits(arr, ds)
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    inverted = photometric == "MONOCHROME1" or shape == "INVERSE"
    step = max(1, min(arr.shape) // _PERCENTILE_SAMPLE)
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2:
        # Every step is a function of the stored value alone: run it once per possible value
        # (at most 65,536) and look the image up, instead of float math on every pixel.
        low = int(np.iinfo(arr.dtype).min)
        index = arr.astype(np.int32) - low if low else arr
        domain = np.arange(low, int(np.iinfo(arr.dtype).max) + 1, dtype=np.int64)
        values = apply_modality_lut(domain, ds)
        sample = apply_modality_lut(arr[::step, ::step], ds)

        def present() -> np.ndarray:  # the values that occur in the image
            return values[np.bincount(index.ravel(), minlength=len(domain)) > 0]

        grey, branch = _apply_voi(values, ds, voi, sample, present)
    else:
        values = apply_modality_lut(arr, ds)
        grey, branch = _apply_voi(values, ds, voi, values[::step, ::step], lambda: values)
        index = None
    if inverted:
        grey = 1.0 - grey  # once, whichever of the two says so
    conversion.update(voi=branch, inverted=inverted)
    out = np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
    if index is not None:
        out = out[index]  # the table, applied to the image
    return Image.fromarray(out, mode="L"), conversion


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR"):
    """PS3.3 C.11.2.1.2 window onto [0, 1]; None when the width is invalid for the function."""
    x = values.astype(np.float64, copy=False)
    if function == "SIGMOID":
        if width <= 0:
            return None
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:  # LINEAR
        return None
    # y = ((x - (c - 0.5)) / (w - 1) + 0.5); below/above the window: 0 / 1. For w == 1 this is
    # a threshold at c - 0.5.
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _apply_voi(
    values: np.ndarray,
    ds: Dataset,
    voi: str,
    sample: np.ndarray,
    present: Callable[[], np.ndarray],
) -> tuple[np.ndarray, str]:
    """VOI step onto [0, 1] floats, and the name of the branch that ran.

    `sample` (a strided view of the image's modality values) and `present()` (the values that
    occur in the image, computed only if needed) feed the percentile fallback; `values` may be
    the image or a table over every possible stored value.
    """
    if voi != "percentile":
        lut = _voi_lut_item(ds)
        if lut is not None and voi == "auto":
            return _apply_voi_lut(values, ds), "voi_lut"
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is not None and width is not None:
            function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                function = "LINEAR"  # PS3.3: LINEAR is the default; unknown values fall back
            out = window(values, center, width, function)
            if out is not None:
                return out, f"window_{function.lower()}"
        if lut is not None:
            return _apply_voi_lut(values, ds), "voi_lut"
    return _percentile_range(values, sample, present), "percentile"


def _voi_lut_item(ds: Dataset) -> Dataset | None:
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    return item


def _apply_voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT, scaled by the range of the LUT's own entries.

    The LUT's entries, not 2**bits - 1 from its descriptor, set the output range: real files
    declare 16 bits for 12-bit LUTs (the image would come out nearly black), and every entry
    is a displayable value, so its own extremes are black and white.
    """
    descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
    entries, first = descriptor[0] or 65536, descriptor[1]
    # Integer input in the LUT's domain: pydicom's apply_voi warns on floats and would wrap
    # values outside the uint16 index range.
    index = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
    mapped = apply_voi(index, ds, 0).astype(np.float64)
    domain = np.arange(first, first + entries, dtype=np.int64)
    table = apply_voi(domain, ds, 0)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        return np.zeros_like(mapped)
    return (mapped - low) / (high - low)


def _percentile_range(
    values: np.ndarray, sample: np.ndarray, present: Callable[[], np.ndarray]
) -> np.ndarray:
    """Linear map of the image's robust range onto [0, 1] (min-max when the percentiles
    coincide); the range comes from `sample` (or `present()`), the map applies to `values`."""
    low, high = (float(v) for v in np.percentile(sample.astype(np.float64), _PERCENTILES))
    if high <= low:
        occurring = present()
        low, high = float(occurring.min()), float(occurring.max())
    if high <= low:
        return np.zeros(values.shape, np.float64)
    return np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def _clean_unused_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Keep values inside BitsStored: mask unsigned data, sign-extend signed data."""
    stored = int(ds.get("BitsStored") or 0)
    if not np.issubdtype(arr.dtype, np.integer):
        return arr
    bits = arr.dtype.itemsize * 8
    if stored <= 0 or stored >= bits:
        return arr
    if int(ds.get("PixelRepresentation") or 0) == 0:
        return arr & np.array((1 << stored) - 1, dtype=arr.dtype)
    signed = arr.astype(np.dtype(f"i{arr.dtype.itemsize}"), copy=False)
    shift = bits - stored
    return (signed << shift) >> shift


def _colour_to_uint8(arr: np.ndarray, ds: Dataset, bits: int | None = None) -> np.ndarray:
    """Colour samples to 8 bits over their range: `bits` (else BitsStored, else 16) bits, or
    the data's maximum if that is larger."""
    if arr.dtype == np.uint8:
        return arr
    stored = bits or int(ds.get("BitsStored") or 16)
    high = float(max(arr.max(), (1 << stored) - 1 if stored < 64 else arr.max()))
    return np.rint(np.clip(arr.astype(np.float64), 0, high) * (255.0 / high)).astype(np.uint8)


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DS/IS element, as a float."""
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    """A pydicom value as str/int/float or a list of them (JSON-serialisable)."""
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [v for v in (_plain(v) for v in value) if v not in (None, "")]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (bytes, Dataset)):
        return None
    return str(value).strip()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]
