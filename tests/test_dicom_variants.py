"""The DICOM stage on the encodings the standard allows, against an independent display pipeline.

Every expected image here is computed in plain numpy from the standard's formulas, never by the
module under test nor by the pydicom functions it calls (`pixel_array`, `apply_modality_lut`,
`apply_voi`):

* stored values: native Pixel Data decoded by hand (byte order from the transfer syntax, the
  value from the low Bits Stored bits, two's complement when Pixel Representation is 1);
* modality values: Rescale Slope/Intercept, or the Modality LUT Sequence with inputs below the
  first entry mapped to the first and above the last to the last (PS3.3 C.11.1.1);
* VOI: the VOI LUT Sequence scaled by its descriptor's 2**bits - 1, inputs clamped as above
  (C.11.2.1.1), or the first Window Center/Width pair through C.11.2.1.2.1's LINEAR function;
  without either, the stage's documented fallback (the 0.5/99.5 percentiles of the modality
  values, min-max when they coincide);
* MONOCHROME1: inverted after VOI, then rounded to 8 bits.

Compressed real files are checked against the hand decode of their uncompressed twin in
pydicom-data (they are lossless encodings of the same pixels). Multi-frame files keep frame 0
(the module's documented policy).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import openjpeg
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from mgll_data.errors import ItemError
from mgll_data.imaging.dicom import process_dicom
from mgll_data.imaging.raster import ImagePolicy
from tests.dicom_fixture import chest, encode, make_dx

FULL = ImagePolicy(image_size=4096)  # no resizing: pixel-exact comparisons


# --------------------------------------------------------------- the independent display pipeline


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto [0, 1]."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    inside = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, inside))


def lut_lookup(x: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """A LUT applied as PS3.3 C.11.1.1/C.11.2.1.1 say: below `first` -> entry 0, past the end
    -> the last entry."""
    index = np.clip(np.asarray(x, dtype=np.int64) - first, 0, len(table) - 1)
    return np.asarray(table, dtype=np.float64)[index]


def percentile_range(x: np.ndarray) -> np.ndarray:
    """The stage's documented no-window fallback: the 0.5/99.5 percentile range onto [0, 1]."""
    low, high = np.percentile(x, [0.5, 99.5])
    if high <= low:
        low, high = x.min(), x.max()
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def to_8bit(y: np.ndarray, monochrome1: bool = False) -> np.ndarray:
    """[0, 1] display values to the stored 8-bit image (MONOCHROME1 inverted after VOI)."""
    if monochrome1:
        y = 1.0 - y
    return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def decode_native(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Frame `frame` of native (uncompressed) Pixel Data decoded by hand, as int64 values."""
    little = ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian
    size = ds.BitsAllocated // 8
    count = ds.Rows * ds.Columns
    words = np.frombuffer(
        ds.PixelData, np.dtype(f"{'<' if little else '>'}u{size}"), count, frame * count * size
    ).astype(np.int64)
    stored = int(ds.BitsStored)
    values = words % (1 << stored)  # the low BitsStored bits; whatever is above is ignored
    if ds.PixelRepresentation == 1:
        values = np.where(values >= 1 << (stored - 1), values - (1 << stored), values)
    return values.reshape(ds.Rows, ds.Columns)


def _lut(item: Dataset, little: bool = True) -> tuple[int, np.ndarray, int]:
    """(first input value, table, bits) of a Modality or VOI LUT item."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):
        data = np.frombuffer(data, "<u2" if little else ">u2")
    table = np.asarray(data, dtype=np.int64).reshape(-1)
    assert len(table) == (entries or 65536)
    return first, table, bits


def display_from_header(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The expected 8-bit image of stored `values` under `ds`'s header, by the standard."""
    if "ModalityLUTSequence" in ds:
        first, table, _ = _lut(ds.ModalityLUTSequence[0])
        x = lut_lookup(values, first, table)
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        x = values.astype(np.float64) * slope + float(ds.get("RescaleIntercept", 0) or 0)
    if "VOILUTSequence" in ds:
        first, table, bits = _lut(ds.VOILUTSequence[0])
        y = lut_lookup(np.rint(x), first, table) / (2**bits - 1)
    elif ds.get("WindowCenter") is not None:
        center, width = ds.WindowCenter, ds.WindowWidth
        if isinstance(center, MultiValue):
            center, width = center[0], width[0]
        assert str(ds.get("VOILUTFunction", "LINEAR")).upper() == "LINEAR"
        y = linear_window(x, float(center), float(width))
    else:
        y = percentile_range(x)
    return to_8bit(y, ds.PhotometricInterpretation == "MONOCHROME1")


def _pixels(source, **kwargs) -> tuple[np.ndarray, dict]:
    encoded, extra = process_dicom(source, FULL, **kwargs)
    image = Image.open(io.BytesIO(encoded.data))
    assert image.mode == "L"
    return np.asarray(image), extra


def _real(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed (pydicom / pydicom-data)"
    return path


# ----------------------------------------------------------------------- generated: encodings


def _signed_chest() -> np.ndarray:
    """12-bit signed anatomy: air -1948, soft tissue -1448..-248, bone 1752 (int64)."""
    return chest().astype(np.int64) - 2048


SYNTAXES = {
    "implicit-le": ImplicitVRLittleEndian,
    "explicit-le": ExplicitVRLittleEndian,
    "explicit-be": ExplicitVRBigEndian,
}


@pytest.mark.parametrize(
    ("syntax", "preamble", "file_meta"),
    [
        ("implicit-le", True, True),
        ("implicit-le", False, True),  # meta group first, no preamble, no "DICM"
        ("implicit-le", False, False),  # the bare data set
        ("explicit-le", False, True),
        ("explicit-le", False, False),
        ("explicit-be", True, True),
        ("explicit-be", False, True),
        ("explicit-be", False, False),
    ],
)
def test_encodings_and_missing_preamble_or_meta_give_the_same_display(syntax, preamble, file_meta):
    values = _signed_chest()
    little = syntax != "explicit-be"
    ds = make_dx(values.astype(np.int16).view(np.uint16), WindowCenter=-300, WindowWidth=2500)
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, 150
    ds.PixelData = values.astype("<i2" if little else ">i2").tobytes()
    data = encode(ds, SYNTAXES[syntax], preamble=preamble, file_meta=file_meta)
    # The bytes are what the case says: a preamble + "DICM" or not; the meta group or not; VRs
    # spelled out (explicit) or not; the first tag's group in this byte order.
    assert (data[128:132] == b"DICM") is preamble
    if not preamble:  # the meta group is always Explicit VR Little Endian
        bare_group = b"\x08\x00" if little else b"\x00\x08"
        assert data[:2] == (b"\x02\x00" if file_meta else bare_group)
    character_set = b"CS\x0a\x00" if little else b"CS\x00\x0a"  # (0008,0005) CS, 10 bytes
    assert (character_set in data) is (syntax != "implicit-le")

    expected = to_8bit(linear_window(values * 2.0 + 150, -300, 2500))
    out, extra = _pixels(data)
    assert np.array_equal(out, expected)
    assert extra["conversion"]["transfer_syntax"] == SYNTAXES[syntax].name
    assert 0 < expected.mean() < 255  # the window shows structure, not one flat grey
    assert len(np.unique(expected)) > 20


# --------------------------------------------------------------------- generated: signed data


@pytest.mark.parametrize("high_bits", ["zero", "sign-extended", "garbage"])
def test_signed_12_bit_in_16_is_sign_extended_whatever_the_high_bits_hold(high_bits):
    """PS3.5 8.1.1: bits above HighBit are not part of the value; bit 11 is the sign."""
    values = _signed_chest()
    values[0, 0], values[0, 1] = -2048, 2047  # both ends of the 12-bit range
    twelve = values % 4096  # two's complement in 12 bits
    words = {
        "zero": twelve,
        "sign-extended": values % 65536,
        "garbage": twelve | 0xA000,  # e.g. overlay bits left above the value
    }[high_bits].astype(np.uint16)
    ds = make_dx(words, WindowCenter=0, WindowWidth=4000)
    ds.PixelRepresentation = 1
    assert (values < 0).mean() > 0.5 and ds.BitsStored == 12
    out, extra = _pixels(encode(ds))
    assert np.array_equal(out, to_8bit(linear_window(values.astype(np.float64), 0, 4000)))
    assert out[0, 0] == 0 and out[0, 1] == 255
    assert extra["PixelRepresentation"] == 1


@pytest.mark.parametrize("syntax", ["explicit-le", "explicit-be"])
def test_signed_16_bit_full_range(syntax):
    rng = np.random.default_rng(0)
    values = chest().astype(np.int64) * 8 - 16000  # -15200 .. 14400
    values[5, :] = rng.integers(-32768, 32768, values.shape[1])
    values[0, 0], values[0, 1] = -32768, 32767
    little = syntax == "explicit-le"
    ds = make_dx(values.astype(np.int16).view(np.uint16), bits_stored=16)
    ds.PixelRepresentation = 1
    ds.WindowCenter, ds.WindowWidth = -1000, 30001
    ds.PixelData = values.astype("<i2" if little else ">i2").tobytes()
    out, _ = _pixels(encode(ds, SYNTAXES[syntax]))
    assert np.array_equal(out, to_8bit(linear_window(values.astype(np.float64), -1000, 30001)))
    assert out[0, 0] == 0 and out[0, 1] == 255


def test_j2k_codestream_wider_than_bits_stored_is_sign_extended():
    """A JPEG 2000 stream that encodes the whole 16-bit container (precision 16, unsigned)
    while the header says 12 signed bits stored: the decoder hands back the 12-bit two's
    complement pattern unextended (pydicom corrects signedness only when the stream's own
    precision is smaller than the container), so the stage has to extend bit 11 itself."""
    values = _signed_chest()
    twelve = (values % 4096).astype(np.uint16)
    stream = openjpeg.encode(twelve, bits_stored=16, photometric_interpretation=2)
    params = openjpeg.get_parameters(stream)
    assert (params["precision"], params["is_signed"]) == (16, False)
    ds = make_dx(twelve, WindowCenter=-300, WindowWidth=3000)
    ds.PixelRepresentation = 1
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    out, extra = _pixels(buffer.getvalue())
    assert extra["conversion"]["transfer_syntax"] == JPEG2000Lossless.name
    assert np.array_equal(out, to_8bit(linear_window(values.astype(np.float64), -300, 3000)))


# ---------------------------------------------------------------------- generated: the LUTs


def _lut_item(descriptor: list[int], table: np.ndarray, **extra) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    item.add_new("LUTData", "US", [int(v) for v in table])
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


@pytest.mark.parametrize("syntax", ["implicit-le", "explicit-be"])
def test_modality_lut_sequence_replaces_rescale(syntax):
    stored = chest()  # 100 .. 3800, so inputs fall below and past the LUT's 100 + 3000 entries
    stored[0, :4] = [0, 99, 3099, 4095]
    first, entries = 100, 3000
    table = np.rint(4000 * np.log1p(np.arange(entries) / 300) / np.log1p(entries / 300))
    ds = make_dx(stored, WindowCenter=2500, WindowWidth=2000)
    ds.ModalityLUTSequence = Sequence(
        [_lut_item([entries, first, 16], table, ModalityLUTType="OD")]
    )
    if syntax == "explicit-be":
        ds.PixelData = stored.astype(">u2").tobytes()
    out, extra = _pixels(encode(ds, SYNTAXES[syntax]))
    modality = table[np.clip(stored.astype(np.int64) - first, 0, entries - 1)]
    expected = to_8bit(linear_window(modality, 2500, 2000))
    assert np.array_equal(out, expected)
    assert extra["conversion"]["voi"] == "window_linear"
    # Clamping: everything below the first input maps like the first input, past the end like
    # the last one; the rescale path (identity here) would have given something else.
    assert out[0, 0] == out[0, 1] and out[0, 2] == out[0, 3]
    assert not np.array_equal(out, to_8bit(linear_window(stored.astype(float), 2500, 2000)))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_sequence_by_the_standard(photometric):
    stored = chest()
    stored[0, :4] = [0, 499, 2547, 4095]
    first, entries, bits = 500, 2048, 12
    table = np.rint((2**bits - 1) * (np.arange(entries) / (entries - 1)) ** 0.6)
    assert table.min() == 0 and table.max() == 2**bits - 1
    ds = make_dx(stored, photometric=photometric, RescaleSlope=1, RescaleIntercept=-100)
    ds.VOILUTSequence = Sequence([_lut_item([entries, first, bits], table)])
    ds.WindowCenter, ds.WindowWidth = 100, 50  # present, but the LUT comes first
    out, extra = _pixels(encode(ds, ImplicitVRLittleEndian))
    modality = stored.astype(np.int64) - 100
    expected = to_8bit(
        lut_lookup(modality, first, table) / (2**bits - 1), photometric == "MONOCHROME1"
    )
    assert np.array_equal(out, expected)
    assert extra["conversion"]["voi"] == "voi_lut"
    assert extra["conversion"]["inverted"] is (photometric == "MONOCHROME1")


# -------------------------------------------------------------- generated: frames, polarity


def _frames() -> np.ndarray:
    base = chest()
    return np.stack([base, 4095 - base, (base // 2) + 1000])


@pytest.mark.parametrize("window", [True, False])
def test_multiframe_keeps_frame_zero(window):
    """Frame 0 alone is converted, its VOI range computed from frame 0 alone."""
    frames = _frames()
    tags = {"WindowCenter": 1800, "WindowWidth": 2200} if window else {}
    ds = make_dx(frames[0], **tags)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype("<u2").tobytes()
    out, extra = _pixels(encode(ds, ImplicitVRLittleEndian))
    assert extra["conversion"]["frames"] == 3 and extra["conversion"]["frame"] == 0
    assert extra["NumberOfFrames"] == 3

    def shown(frame: np.ndarray) -> np.ndarray:
        x = frame.astype(np.float64)
        return to_8bit(linear_window(x, 1800, 2200) if window else percentile_range(x))

    assert np.array_equal(out, shown(frames[0]))
    assert not np.array_equal(out, shown(frames[1]))
    if not window:  # a range taken over all frames would differ from frame 0's own
        everything = frames.astype(np.float64)
        low, high = np.percentile(everything, [0.5, 99.5])
        pooled = to_8bit(np.clip((frames[0] - low) / (high - low), 0, 1))
        assert not np.array_equal(out, pooled)


def test_monochrome1_is_inverted_after_the_window():
    values = _signed_chest()
    ds = make_dx((values % 65536).astype(np.uint16), photometric="MONOCHROME1")
    ds.PixelRepresentation = 1
    ds.PixelData = values.astype(">i2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, 1024
    ds.WindowCenter, ds.WindowWidth = 500, 1500
    out, extra = _pixels(encode(ds, ExplicitVRBigEndian))
    x = values + 1024.0
    assert np.array_equal(out, to_8bit(linear_window(x, 500, 1500), monochrome1=True))
    # Inverting the stored values before the window would give a different picture.
    assert not np.array_equal(out, to_8bit(linear_window(-x, 500, 1500)))
    assert extra["conversion"]["inverted"] is True


# ----------------------------------------------------------- real files: pydicom/pydicom-data

NATIVE = [
    "MR_small.dcm",  # signed 16, window, Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "MR_small_expb.dcm",  # Explicit VR Big Endian (another writer)
    "CT_small.dcm",  # signed 16, rescale -1024, no window: the percentile fallback
    "693_UNCR.dcm",  # signed 14 bits in 16, rescale, narrow CT window
    "mlut_18.dcm",  # Modality LUT Sequence; 12 signed bits whose high bits are not extended
    "vlut_04.dcm",  # VOI LUT Sequence, 8-bit
    "emri_small.dcm",  # 10 frames, 12 bits, no window
    "emri_small_big_endian.dcm",  # the same, Explicit VR Big Endian
    "RG3_UNCR.dcm",  # a 10-bit MONOCHROME1 CR
]


@pytest.mark.parametrize("name", NATIVE)
def test_real_native_files_match_a_hand_decode(name):
    path = _real(name)
    ds = pydicom.dcmread(path)
    expected = display_from_header(decode_native(ds), ds)
    out, extra = _pixels(path)
    assert np.array_equal(out, expected)
    assert extra["conversion"]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID.name
    assert expected.std() > 5


def test_real_file_that_needs_sign_extension():
    """mlut_18.dcm stores -1 as 0x0FFF and -2048 as 0xF800: both mean the same 12 bits."""
    ds = pydicom.dcmread(_real("mlut_18.dcm"))
    words = np.frombuffer(ds.PixelData, "<u2")
    assert ds.PixelRepresentation == 1 and ds.BitsStored == 12
    assert (words >= 0xF000).any() and ((words >= 0x0800) & (words < 0x1000)).any()
    values = decode_native(ds)
    assert values.min() < 0 and values.max() < 2048


@pytest.mark.parametrize(
    ("compressed", "plain"),
    [
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # JPEG 2000 lossless, rescale + window
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless, signed CT
        ("emri_small_RLE.dcm", "emri_small.dcm"),  # RLE, multi-frame
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # JPEG-LS, multi-frame
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # JPEG 2000, multi-frame
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000, signed 16
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS, signed 16
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),  # JPEG 2000, MONOCHROME1
    ],
)
def test_real_compressed_files_match_their_uncompressed_twin(compressed, plain):
    ds = pydicom.dcmread(_real(compressed))
    values = decode_native(pydicom.dcmread(_real(plain)))
    out, extra = _pixels(_real(compressed))
    assert extra["conversion"]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID.name
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(out, display_from_header(values, ds))


def _strip(data: bytes, meta: bool) -> bytes:
    """A Part 10 file without its preamble and "DICM" (and without its meta group)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) UL
    assert data[136:140] == b"UL\x04\x00"
    if meta:
        return data[132:]
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


@pytest.mark.parametrize("keep_meta", [True, False])
def test_real_file_without_preamble(keep_meta):
    path = _real("MR_small.dcm")
    ds = pydicom.dcmread(path)
    stripped = _strip(Path(path).read_bytes(), keep_meta)
    assert stripped[:2] == (b"\x02\x00" if keep_meta else b"\x08\x00")
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(io.BytesIO(stripped))  # not a Part 10 file any more
    out, extra = _pixels(stripped)
    assert np.array_equal(out, display_from_header(decode_native(ds), ds))
    assert extra["conversion"]["transfer_syntax"] == ExplicitVRLittleEndian.name


@pytest.mark.parametrize(
    "name", ["no_meta.dcm", "ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"]
)
def test_real_files_without_preamble_are_read_not_refused(name):
    """pydicom's preamble-less samples hold no image: read (with the fallback), they are
    reported as such, not as unreadable files."""
    data = Path(_real(name)).read_bytes()
    assert data[128:132] != b"DICM"
    with pytest.raises(ItemError) as caught:
        process_dicom(data, FULL)
    assert caught.value.reason == "not a DICOM image (no pixel data)"
