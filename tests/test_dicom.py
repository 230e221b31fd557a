"""The DICOM stage: pydicom's real files (compressed included) and generated DX files."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, RLELossless

from mgll_data.errors import ItemError
from mgll_data.imaging.dicom import WHITELIST, process_dicom
from mgll_data.imaging.raster import ImagePolicy
from tests.dicom_fixture import DX_PROCESSING, PHI, chest, make_dx, to_bytes

FULL = ImagePolicy(image_size=4096)  # no resizing: pixel-exact comparisons
CR_FILES = [f"dicomdirtests/77654033/CR{i}/{n}" for i, n in ((1, 6154), (2, 6247), (3, 6278))]


def _real(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed (pydicom / pydicom-data)"
    return path


def _pixels(source, policy=FULL, **kwargs) -> tuple[np.ndarray, dict]:
    encoded, extra = process_dicom(source, policy, **kwargs)
    image = Image.open(io.BytesIO(encoded.data))
    assert image.mode == ("L" if policy.color == "grey" else "RGB")
    assert image.size == (encoded.width, encoded.height)
    return np.asarray(image), extra


def _linear(x, c, w):  # PS3.3 C.11.2.1.2.1, written out independently of the module
    y = np.where(
        x <= c - 0.5 - (w - 1) / 2,
        0.0,
        np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5),
    )
    return y


# --- real files shipped with pydicom / pydicom-data --------------------------------------------


@pytest.mark.parametrize("name", CR_FILES)
def test_real_cr_monochrome1_matches_manual_pipeline(name):
    ds = pydicom.dcmread(_real(name))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)
    x = raw * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 255 - np.rint(_linear(x, c, w) * 255).astype(np.int16)  # inverted after VOI
    out, extra = _pixels(_real(name))
    assert np.array_equal(out.astype(np.int16), expected)
    assert extra["conversion"]["inverted"] is True
    assert extra["PhotometricInterpretation"] == "MONOCHROME1" and extra["Modality"] == "CR"
    assert extra["ViewPosition"] == ds.ViewPosition


def test_real_cr_bones_bright_like_monochrome2():
    """Relabelled as MONOCHROME2 the same pixels render as the exact negative."""
    ds = pydicom.dcmread(_real("RG1_UNCR.dcm"))  # a real 1955 x 1841 15-bit CR, MONOCHROME1
    mono1, _ = _pixels(to_bytes(ds))
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["inverted"] is False
    assert np.array_equal(mono1.astype(np.int16), 255 - mono2.astype(np.int16))
    assert mono1.std() > 10


@pytest.mark.parametrize(
    ("compressed", "plain"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # JPEG 2000 lossless CR, MONOCHROME1
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless (process 14), colour
    ],
)
def test_lossless_compressed_equals_uncompressed(compressed, plain):
    out, extra = _pixels(_real(compressed))
    reference, _ = _pixels(_real(plain))
    assert extra["conversion"]["transfer_syntax"] != "Explicit VR Little Endian"
    assert np.array_equal(out, reference)
    assert out.std() > 5


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",  # JPEG 2000 (lossy allowed)
        "JPEG-LL.dcm",  # JPEG lossless
        "JPGExtended.dcm",  # JPEG extended 12-bit
        "SC_jpeg_no_color_transform.dcm",  # JPEG baseline
        "US1_J2KR.dcm",  # JPEG 2000, YBR_RCT colour
        "SC_rgb_small_odd_jpeg.dcm",  # JPEG baseline, odd size, YBR_FULL
    ],
)
def test_every_decodable_compressed_sample_converts(name):
    ds = pydicom.dcmread(_real(name))
    out, extra = _pixels(_real(name))
    assert out.shape == (ds.Rows, ds.Columns)
    assert out.max() > out.min()
    assert extra["conversion"]["transfer_syntax"] == ds.file_meta.TransferSyntaxUID.name


def test_multiframe_keeps_first_frame():
    path = _real("emri_small.dcm")  # 10 frames, MONOCHROME2, no window
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    out, extra = _pixels(path)
    assert extra["conversion"]["frames"] == 10 and extra["conversion"]["frame"] == 0
    single = pydicom.dcmread(path)
    for index, expected_frame in ((0, True), (5, False)):
        single.NumberOfFrames = 1
        single.PixelData = frames[index].tobytes()
        other, _ = _pixels(to_bytes(single))
        assert np.array_equal(out, other) is expected_frame


def test_multiframe_colour_jpeg_decodes_only_one_frame():
    out, extra = _pixels(_real("color3d_jpeg_baseline.dcm"))  # 120 YBR JPEG frames
    assert out.shape == (480, 640) and extra["conversion"]["frames"] == 120


def test_colour_becomes_luminance():
    ds = pydicom.dcmread(_real("SC_rgb.dcm"))
    out, extra = _pixels(_real("SC_rgb.dcm"))
    rgb = ds.pixel_array.astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out - luma).max() <= 1.0
    assert extra["conversion"]["colour"] == "RGB"
    coloured, _ = _pixels(_real("SC_rgb.dcm"), ImagePolicy(image_size=4096, color="rgb"))
    assert np.array_equal(coloured, ds.pixel_array)


def test_broken_and_non_image_files_are_item_errors(tmp_path):
    truncated = _real("JPEG2000.dcm")
    data = open(truncated, "rb").read()
    cr = open(_real(CR_FILES[0]), "rb").read()
    png = io.BytesIO()
    Image.new("L", (8, 8)).save(png, "PNG")
    cases = {
        "lossy": _real("JPEG-lossy.dcm"),  # a JPEG stream no installed decoder accepts
        "j2k truncated": data[: len(data) // 2],
        "raw truncated": cr[: len(cr) - 100],
        "header only": cr[:400],
        "no pixels": _real("rtplan.dcm"),
        "png": png.getvalue(),
        "empty": b"",
        "gzip truncated": gzip.compress(cr)[:60],
        "missing": str(tmp_path / "nope.dcm"),
    }
    for label, source in cases.items():
        with pytest.raises(ItemError) as caught:
            process_dicom(source, FULL)
        assert caught.value.stage == "image", label
        assert "\n" not in caught.value.reason and caught.value.reason, label


# --- generated DX files -----------------------------------------------------------------------


def test_monochrome1_and_2_of_same_content_are_inverses_with_bright_bone():
    pixels = chest()
    window = {"WindowCenter": 2000, "WindowWidth": 4000}
    mono2, _ = _pixels(to_bytes(make_dx(pixels, **window)))
    # The same anatomy as a MONOCHROME1 detector stores it: bone low, air high.
    mono1, _ = _pixels(
        to_bytes(
            make_dx(4095 - pixels, photometric="MONOCHROME1", WindowCenter=2095, WindowWidth=4000)
        )
    )
    bone, air = mono1[25, 24], mono1[25, 2]
    assert bone > 240 and air < 20  # bone bright, air dark
    assert np.abs(mono1.astype(int) - mono2.astype(int)).max() <= 1
    # Identical stored values, only the photometric differs: exact negatives.
    flipped, _ = _pixels(to_bytes(make_dx(pixels, photometric="MONOCHROME1", **window)))
    assert np.array_equal(flipped.astype(int), 255 - mono2.astype(int))


def test_presentation_lut_inverse_flips_exactly_once():
    stored = 4095 - chest()  # MONOCHROME1 storage: bone low
    window = {"WindowCenter": 2000, "WindowWidth": 4000}
    mono1, _ = _pixels(to_bytes(make_dx(stored, photometric="MONOCHROME1", **window)))
    both, extra = _pixels(
        to_bytes(
            make_dx(stored, photometric="MONOCHROME1", PresentationLUTShape="INVERSE", **window)
        )
    )
    assert np.array_equal(both, mono1)  # never flipped twice
    assert both[25, 24] > 200 and both[25, 2] < 30  # bone bright, air dark
    assert extra["PresentationLUTShape"] == "INVERSE"
    mono2_inverse, _ = _pixels(to_bytes(make_dx(stored, PresentationLUTShape="INVERSE", **window)))
    assert np.array_equal(mono2_inverse, mono1)


def test_multivalued_window_uses_first_pair():
    pixels = chest()
    both, _ = _pixels(
        to_bytes(make_dx(pixels, WindowCenter=[1500, 3000], WindowWidth=[1000, 6000]))
    )
    first, extra = _pixels(to_bytes(make_dx(pixels, WindowCenter=1500, WindowWidth=1000)))
    second, _ = _pixels(to_bytes(make_dx(pixels, WindowCenter=3000, WindowWidth=6000)))
    assert np.array_equal(both, first) and not np.array_equal(both, second)
    assert extra["conversion"]["voi"] == "window_linear"
    x = pixels.astype(np.float64)
    assert np.array_equal(first, np.rint(_linear(x, 1500, 1000) * 255).astype(np.uint8))


def test_sigmoid_and_linear_exact_follow_the_standard():
    pixels = chest()
    c, w = 1500.0, 1200.0
    x = pixels.astype(np.float64)
    linear, _ = _pixels(to_bytes(make_dx(pixels, WindowCenter=c, WindowWidth=w)))
    sigmoid, extra = _pixels(
        to_bytes(make_dx(pixels, WindowCenter=c, WindowWidth=w, VOILUTFunction="SIGMOID"))
    )
    assert extra["conversion"]["voi"] == "window_sigmoid"
    assert not np.array_equal(sigmoid, linear)
    expected = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))  # PS3.3 C.11.2.1.3.1
    for r, col in ((0, 0), (10, 10), (30, 20), (59, 47), (25, 24)):
        assert abs(int(sigmoid[r, col]) - expected[r, col]) <= 0.5 + 1e-9
    # Just past the window's upper edge LINEAR saturates, the sigmoid does not.
    assert pixels[59, 47] > c + w / 2
    assert linear[59, 47] == 255 and 200 < sigmoid[59, 47] < 250
    exact, extra = _pixels(
        to_bytes(make_dx(pixels, WindowCenter=c, WindowWidth=w, VOILUTFunction="LINEAR_EXACT"))
    )
    assert extra["conversion"]["voi"] == "window_linear_exact"
    expected = np.clip((x - c) / w + 0.5, 0, 1) * 255  # PS3.3 C.11.2.1.3.2
    assert np.abs(exact - expected).max() <= 0.5 + 1e-9


def test_rescale_slope_intercept_applied_before_window():
    pixels = chest()
    ds = make_dx(
        pixels, RescaleSlope=2.0, RescaleIntercept=-1000.0, WindowCenter=2000, WindowWidth=3000
    )
    out, extra = _pixels(to_bytes(ds))
    x = pixels * 2.0 - 1000.0
    assert np.array_equal(out, np.rint(_linear(x, 2000, 3000) * 255).astype(np.uint8))
    assert extra["RescaleSlope"] == 2.0 and extra["RescaleIntercept"] == -1000.0
    unscaled, _ = _pixels(to_bytes(make_dx(pixels, WindowCenter=2000, WindowWidth=3000)))
    assert not np.array_equal(out, unscaled)


def test_voi_lut_sequence_preferred_over_window_and_configurable():
    pixels = chest()
    item = Dataset()
    # Declares 16 bits while the entries are 12-bit: a quirk met in real CR files.
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    table = (np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(np.uint16)  # a gamma curve
    item.add_new("LUTData", "US", table.tolist())
    ds = make_dx(pixels, RescaleSlope=1, RescaleIntercept=0, WindowCenter=500, WindowWidth=10)
    ds.VOILUTSequence = Sequence([item])
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "voi_lut"
    expected = np.rint(table[pixels].astype(np.float64) / 4095 * 255)
    assert np.abs(out - expected).max() <= 1
    windowed, extra = _pixels(to_bytes(ds), voi="window")
    assert extra["conversion"]["voi"] == "window_linear" and not np.array_equal(windowed, out)


def test_without_window_a_hot_pixel_does_not_wash_out_the_image():
    pixels = np.tile(np.linspace(1000, 2000, 64).astype(np.uint16), (40, 1))  # soft tissue
    pixels[0, 0] = 4095  # one hot detector element
    pixels[1, 1] = 0  # and a dead one
    out, extra = _pixels(to_bytes(make_dx(pixels)))
    assert extra["conversion"]["voi"] == "percentile"
    # Min-max would squeeze the ramp into about 62 grey levels; the robust range spreads it.
    ramp = out[5]
    assert int(ramp.max()) - int(ramp.min()) > 240
    assert np.all(np.diff(ramp.astype(int)) >= 0)


def test_without_window_a_flat_image_falls_back_to_min_max():
    pixels = np.full((40, 64), 1000, np.uint16)
    pixels[3, 3:6] = 3000  # too few to move the percentiles: the range is the image's min-max
    out, extra = _pixels(to_bytes(make_dx(pixels)))
    assert extra["conversion"]["voi"] == "percentile"
    assert out[3, 4] == 255 and out[20, 20] == 0


def test_unused_high_bits_are_masked():
    pixels = chest()
    clean, _ = _pixels(to_bytes(make_dx(pixels, WindowCenter=2000, WindowWidth=4000)))
    dirty, _ = _pixels(
        to_bytes(make_dx(pixels | 0xA000, WindowCenter=2000, WindowWidth=4000))  # garbage bits
    )
    assert np.array_equal(clean, dirty)


def test_for_processing_is_skipped_unless_asked():
    ds = make_dx(chest(), sop_class=DX_PROCESSING)
    with pytest.raises(ItemError, match="For Processing"):
        process_dicom(to_bytes(ds), FULL)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    with pytest.raises(ItemError, match="For Processing"):  # the intent alone is enough
        process_dicom(to_bytes(ds), FULL)
    out, extra = _pixels(to_bytes(ds), skip_for_processing=False)
    assert out.shape == (60, 48) and extra["PresentationIntentType"] == "FOR PROCESSING"


def test_phi_never_reaches_extra_or_image_bytes():
    data = to_bytes(make_dx(chest(), WindowCenter=2000, WindowWidth=4000))
    for value in PHI.values():
        assert value.encode() in data  # planted
    for policy in (FULL, ImagePolicy(image_size=32, format="jpeg")):
        encoded, extra = process_dicom(data, policy)
        text = json.dumps(extra, sort_keys=True)
        for value in PHI.values():
            for part in value.split("^"):
                assert part not in text and part.encode() not in encoded.data
        assert set(extra) <= set(WHITELIST) | {"conversion"}
        assert extra["Modality"] == "DX" and extra["ViewPosition"] == "AP"
        assert extra["StudyDescription"] == "CHEST (PORTABLE AP)"
        assert "UID" not in text.upper().replace("TRANSFER_SYNTAX", "")
        assert json.loads(text) == extra  # plain JSON values


def test_gzipped_dicom_path_and_bytes(tmp_path):
    data = to_bytes(
        make_dx(chest(), photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=4000)
    )
    plain, _ = _pixels(data)
    path = tmp_path / "s1.dcm.gz"
    path.write_bytes(gzip.compress(data))
    from_path, _ = _pixels(str(path))
    from_bytes, _ = _pixels(gzip.compress(data))
    assert np.array_equal(plain, from_path) and np.array_equal(plain, from_bytes)


def test_generated_compressed_dx_round_trips():
    ds = make_dx(
        4095 - chest(),
        photometric="MONOCHROME1",
        WindowCenter=2000,
        WindowWidth=4000,
        PresentationLUTShape="INVERSE",
    )
    reference, _ = _pixels(to_bytes(ds))
    for syntax in (RLELossless, JPEG2000Lossless):
        copy = pydicom.dcmread(io.BytesIO(to_bytes(ds)))
        copy.compress(syntax)
        out, extra = _pixels(to_bytes(copy))
        assert extra["conversion"]["transfer_syntax"] == syntax.name
        assert np.array_equal(out, reference)


def test_never_upscaled_and_aspect_kept():
    ds = make_dx(chest(300, 200), WindowCenter=2000, WindowWidth=4000)
    encoded, _ = process_dicom(to_bytes(ds), ImagePolicy(image_size=512))
    assert (encoded.width, encoded.height) == (200, 300)
    assert (encoded.orig_width, encoded.orig_height) == (200, 300)
    encoded, _ = process_dicom(to_bytes(ds), ImagePolicy(image_size=120))
    assert (encoded.width, encoded.height) == (80, 120)
    assert Image.open(io.BytesIO(encoded.data)).size == (80, 120)
