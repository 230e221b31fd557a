"""DICOM stage behaviours that mutation testing (benchmarks/mutation.py) found untested.

Expected images are computed here in numpy from the standard's formulas (PS3.3 C.11) and the
module's documented policies, never by ``mgll_data.dicom``: the ``voi="percentile"`` override,
the window fallbacks (a centre without a width, an unknown VOI LUT Function, widths the
functions do not allow), VOI LUTs that start above 0, hold 65,536 entries, are flat or lack
their data, 16-bit and palette colour, Float Pixel Data, the percentile sample grid, and the
messages and stages of the item errors. Small helpers of the module (`window`,
`_clean_unused_bits`, `_colour_to_uint8`, `_one_line`, `dicom_fields`) are called directly
where a decoder in this environment never hands them the case (pydicom already masks unused
bits, for instance).
"""

from __future__ import annotations

import gzip
import io
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from mgll_data.errors import ItemError
from mgll_data.imaging.dicom import (
    _clean_unused_bits,
    _colour_to_uint8,
    _one_line,
    _plain,
    dataset_to_image,
    dicom_fields,
    process_dicom,
    read_dataset,
    window,
)
from mgll_data.imaging.raster import ImagePolicy
from tests.dicom_fixture import DX_PROCESSING, chest, make_dx, to_bytes

FULL = ImagePolicy(image_size=4096)  # no resizing: pixel-exact comparisons
RGB = ImagePolicy(image_size=4096, color="rgb")


def _pixels(source, policy: ImagePolicy = FULL, **kwargs) -> tuple[np.ndarray, dict]:
    encoded, extra = process_dicom(source, policy, **kwargs)
    return np.asarray(Image.open(io.BytesIO(encoded.data))), extra


def _to_8bit(y: np.ndarray, invert: bool = False) -> np.ndarray:
    """[0, 1] display values to 8 bits (MONOCHROME1 inverted after VOI)."""
    y = 1.0 - y if invert else y
    return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def _linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, piecewise as the standard writes it."""
    x = np.asarray(x, dtype=np.float64)
    below, above = x <= c - 0.5 - (w - 1) / 2, x > c - 0.5 + (w - 1) / 2
    return np.where(below, 0.0, np.where(above, 1.0, ((x - (c - 0.5)) / (w - 1) + 0.5)))


def _percentile_display(x: np.ndarray) -> np.ndarray:
    """The documented no-window policy: 0.5/99.5 percentiles onto [0, 1] (min-max if equal)."""
    x = np.asarray(x, dtype=np.float64)
    low, high = np.percentile(x, [0.5, 99.5])
    if high <= low:
        low, high = x.min(), x.max()
    if high <= low:
        return np.zeros_like(x)
    return np.clip((x - low) / (high - low), 0.0, 1.0)


def _lut_item(descriptor: list[int], table: np.ndarray | None, vr: str = "US") -> Dataset:
    """A LUT item; `vr="OW"` stores the data as words (needed past 64 KiB in explicit VR)."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)
    if table is not None:
        data = table.astype("<u2").tobytes() if vr == "OW" else [int(v) for v in table]
        item.add_new("LUTData", vr, data)
    return item


def _error(source, policy: ImagePolicy = FULL, **kwargs) -> ItemError:
    with pytest.raises(ItemError) as caught:
        process_dicom(source, policy, **kwargs)
    assert caught.value.stage == "image"
    assert str(caught.value) == caught.value.reason
    return caught.value


# ----------------------------------------------------------------------------- VOI choices


def test_voi_percentile_ignores_the_header_window():
    pixels = chest()
    data = to_bytes(make_dx(pixels, WindowCenter=1000, WindowWidth=200))
    out, extra = _pixels(data, voi="percentile")
    assert extra["conversion"]["voi"] == "percentile"
    assert np.array_equal(out, _to_8bit(_percentile_display(pixels)))
    windowed, _ = _pixels(data)  # the default uses the window: a different picture
    assert np.array_equal(windowed, _to_8bit(_linear(pixels, 1000, 200)))
    assert not np.array_equal(out, windowed)


def test_unknown_voi_option_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"^voi must be auto, window or percentile, not 'lut'$"):
        process_dicom(to_bytes(make_dx(chest())), FULL, voi="lut")


def test_window_centre_without_width_falls_back_to_percentiles():
    pixels = chest()
    out, extra = _pixels(to_bytes(make_dx(pixels, WindowCenter=1000)))
    assert extra["conversion"]["voi"] == "percentile"
    assert np.array_equal(out, _to_8bit(_percentile_display(pixels)))


def test_unknown_voi_lut_function_is_linear():
    pixels = chest()
    ds = make_dx(pixels, WindowCenter=1500, WindowWidth=1000, VOILUTFunction="LOG")
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "window_linear"
    assert np.array_equal(out, _to_8bit(_linear(pixels, 1500, 1000)))


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT"])
def test_zero_width_for_sigmoid_or_linear_exact_falls_back_to_percentiles(function):
    pixels = chest()
    ds = make_dx(pixels, WindowCenter=1500, WindowWidth=0, VOILUTFunction=function)
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "percentile"
    assert np.array_equal(out, _to_8bit(_percentile_display(pixels)))


def test_voi_window_option_prefers_the_window_and_falls_back_to_the_lut():
    pixels = chest()
    table = np.rint(np.linspace(0, 4095, 4096) ** 1.5 / 4095**0.5)
    lut = Sequence([_lut_item([4096, 0, 12], table)])
    with_both = make_dx(pixels, WindowCenter=1500, WindowWidth=1000)
    with_both.VOILUTSequence = lut
    out, extra = _pixels(to_bytes(with_both), voi="window")
    assert extra["conversion"]["voi"] == "window_linear"
    assert np.array_equal(out, _to_8bit(_linear(pixels, 1500, 1000)))
    lut_only = make_dx(pixels)
    lut_only.VOILUTSequence = lut
    out, extra = _pixels(to_bytes(lut_only), voi="window")
    assert extra["conversion"]["voi"] == "voi_lut"
    assert np.array_equal(out, _to_8bit(table[pixels] / table.max()))


def test_dataset_to_image_defaults_to_auto_the_lut_before_the_window():
    pixels = chest()
    ds = make_dx(pixels, WindowCenter=1500, WindowWidth=1000)
    table = np.linspace(0, 4095, 4096)[::-1]  # a reversing LUT: clearly not the window
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 12], table)])
    image, conversion = dataset_to_image(read_dataset(to_bytes(ds)))
    assert conversion["voi"] == "voi_lut"
    assert np.array_equal(np.asarray(image), _to_8bit(table[pixels] / 4095))


# ----------------------------------------------------------------------------- VOI LUTs


def test_voi_lut_starting_above_zero_is_clamped_and_scaled_by_its_own_range():
    """First input 100, 1000 entries from 200 to 3000: inputs outside the LUT take its end
    entries, and the entries' own extremes (not 0 and 2**16 - 1) are black and white."""
    pixels = chest()  # 100 .. 3800
    pixels[0, :4] = [0, 99, 1099, 4095]
    first, entries = 100, 1000
    table = np.rint(200 + 2800 * (np.arange(entries) / (entries - 1)) ** 0.7)
    ds = make_dx(pixels)
    ds.VOILUTSequence = Sequence([_lut_item([entries, first, 16], table)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # integer inputs: pydicom's LUT code does not warn
        out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "voi_lut"
    looked_up = table[np.clip(pixels.astype(np.int64) - first, 0, entries - 1)]
    expected = _to_8bit((looked_up - table.min()) / (table.max() - table.min()))
    assert np.array_equal(out, expected)
    assert out[0, 0] == out[0, 1] == 0 and out[0, 2] == out[0, 3] == 255


def test_voi_lut_of_65536_entries_clamps_values_past_its_end():
    """Descriptor entries 0 means 65,536; modality values past 65,535 (slope 20 on 12 bits)
    take the last entry, never wrap around to the first."""
    pixels = chest()
    table = np.arange(65536) // 2 + 1000
    ds = make_dx(pixels, RescaleSlope=20, RescaleIntercept=0)
    ds.VOILUTSequence = Sequence([_lut_item([0, 0, 16], table, vr="OW")])
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "voi_lut"
    modality = np.clip(pixels.astype(np.int64) * 20, 0, 65535)
    expected = _to_8bit((table[modality] - table.min()) / (table.max() - table.min()))
    assert (pixels.astype(np.int64) * 20 > 65535).any()
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(("photometric", "shade"), [("MONOCHROME2", 0), ("MONOCHROME1", 255)])
def test_flat_voi_lut_gives_a_flat_image(photometric, shade):
    ds = make_dx(chest(), photometric=photometric)
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 12], np.full(4096, 700))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 on the way
        out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "voi_lut"
    assert (out == shade).all()


def test_voi_lut_item_without_data_is_ignored_for_the_window():
    pixels = chest()
    ds = make_dx(pixels, WindowCenter=2000, WindowWidth=3000)
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 12], None)])
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "window_linear"
    assert np.array_equal(out, _to_8bit(_linear(pixels, 2000, 3000)))


def test_a_lut_shorter_than_its_descriptor_is_an_item_error():
    ds = make_dx(chest())
    ds.VOILUTSequence = Sequence([_lut_item([4096, 0, 16], np.arange(100))])
    err = _error(to_bytes(ds))
    assert err.reason.startswith("cannot convert DICOM pixels (")
    assert "out of bounds" in err.reason and err.reason.endswith(")")


# ----------------------------------------------------------------------------- window()


def test_window_linear_of_width_one_is_a_threshold_at_centre_minus_half():
    x = np.array([8.0, 9.0, 9.5, 9.6, 10.0, 11.0])
    assert window(x, 10.0, 1.0).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert window(np.array([9.0, 10.0]), 9.5, 1.0).tolist() == [0.0, 1.0]  # x == c - 0.5 -> 0
    assert window(x, 10.0, 0.5) is None  # LINEAR needs width >= 1


def test_window_linear_of_width_two_follows_the_formula():
    x = np.array([-100.0, 8.0, 9.0, 9.5, 10.0, 11.0, 100.0])
    np.testing.assert_array_equal(window(x, 10.0, 2.0), _linear(x, 10.0, 2.0))
    np.testing.assert_array_equal(window(x, 10.0, 2.0, "LINEAR"), _linear(x, 10.0, 2.0))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_maps_onto_zero_one(function):
    x = np.array([-1e6, -50.0, 0.0, 40.0, 50.0, 60.0, 1e6])
    with np.errstate(over="ignore"):  # the sigmoid's exp overflows to inf: 1 / inf = 0
        y = window(x, 50.0, 20.0, function)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert y[0] == 0.0 if function != "SIGMOID" else y[0] < 1e-12
    assert y[-1] == 1.0 if function != "SIGMOID" else y[-1] > 1 - 1e-12


def test_window_linear_exact_and_sigmoid_widths():
    x = np.array([0.0, 10.0, 20.0])
    np.testing.assert_allclose(window(x, 10.0, 1.0, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(
        window(x, 10.0, 1.0, "SIGMOID"), 1.0 / (1.0 + np.exp(-4.0 * (x - 10.0)))
    )
    np.testing.assert_allclose(window(x, 10.0, 40.0, "LINEAR_EXACT"), [0.25, 0.5, 0.75])
    for function in ("LINEAR_EXACT", "SIGMOID"):
        assert window(x, 10.0, 0.0, function) is None
        assert window(x, 10.0, -1.0, function) is None
    assert window(np.array([3]), 1.0, 2.0).dtype == np.float64


# ----------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize(("photometric", "shade"), [("MONOCHROME2", 0), ("MONOCHROME1", 255)])
def test_flat_image_without_window_is_flat(photometric, shade):
    ds = make_dx(np.full((20, 30), 1234, np.uint16), photometric=photometric)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "percentile" and (out == shade).all()


def test_collapsed_percentiles_use_every_occurring_value_even_a_single_pixel():
    pixels = np.full((40, 40), 1000, np.uint16)
    pixels[7, 9] = 3000  # one hot pixel: the 99.5th percentile is still 1000
    pixels[30, 2] = 200  # one cold pixel
    out, _ = _pixels(to_bytes(make_dx(pixels)))
    assert out[7, 9] == 255 and out[30, 2] == 0
    assert (out[pixels == 1000] == round(800 / 2800 * 255)).all()


def test_collapsed_percentiles_of_signed_pixels_use_the_occurring_values():
    pixels = np.full((40, 40), -500, np.int64)
    pixels[3, 3], pixels[20, 30] = 1500, -1500  # single pixels: the percentiles stay at -500
    ds = make_dx((pixels % 65536).astype(np.uint16), bits_stored=16)
    ds.PixelRepresentation = 1
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "percentile"
    assert out[3, 3] == 255 and out[20, 30] == 0
    assert (out[pixels == -500] == round(1000 / 3000 * 255)).all()


def test_small_images_take_percentiles_over_every_pixel():
    """Below 1024 pixels a side the sample grid is the whole image (step 1)."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.where((y % 2 == 1) | (x % 2 == 1), 100 + 40 * x + 7 * y, 2000).astype(np.uint16)
    out, _ = _pixels(to_bytes(make_dx(pixels)))
    assert np.array_equal(out, _to_8bit(_percentile_display(pixels)))
    # every other row and column would have seen a flat image
    assert not np.array_equal(out, _to_8bit(_percentile_display(pixels[::2, ::2])))


def test_large_images_take_percentiles_on_the_documented_grid():
    """At 1024 pixels a side the range comes from every second row and column (about 512)."""
    y, x = np.mgrid[0:1024, 0:1024]
    pixels = np.where((y % 2 == 0) & (x % 2 == 0), 1000 + x, 500 + 3 * y).astype(np.uint16)
    out, _ = _pixels(to_bytes(make_dx(pixels)))
    low, high = np.percentile(pixels[::2, ::2].astype(np.float64), [0.5, 99.5])
    expected = _to_8bit(np.clip((pixels - low) / (high - low), 0.0, 1.0))
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, _to_8bit(_percentile_display(pixels)))


# ----------------------------------------------------------------------------- float data


def _float_dx(values: np.ndarray, **tags) -> Dataset:
    ds = make_dx(np.zeros(values.shape, np.uint16), **tags)
    del ds.PixelData
    del ds.PixelRepresentation
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = values.astype("<f4").tobytes()
    return ds


def test_float_pixel_data_without_window_uses_percentiles():
    values = (chest().astype(np.float32) - 1000.0) / 7.0
    out, extra = _pixels(to_bytes(_float_dx(values)))
    assert extra["conversion"]["voi"] == "percentile"
    assert np.array_equal(out, _to_8bit(_percentile_display(values.astype(np.float64))))


def test_float_pixel_data_percentile_option_and_collapsed_percentiles():
    values = np.full((30, 30), 2.5, np.float32)
    values[4, 5], values[10, 20] = 9.5, -1.5  # single pixels: the percentiles stay at 2.5
    ds = _float_dx(values, WindowCenter=0, WindowWidth=2)
    out, extra = _pixels(to_bytes(ds), voi="percentile")
    assert extra["conversion"]["voi"] == "percentile"
    assert out[4, 5] == 255 and out[10, 20] == 0
    assert (out[values == 2.5] == round(4 / 11 * 255)).all()
    windowed, extra = _pixels(to_bytes(ds))  # the default follows the window
    assert extra["conversion"]["voi"] == "window_linear"
    assert np.array_equal(windowed, _to_8bit(_linear(values, 0, 2)))


def test_float_pixel_data_with_rescale_and_window():
    values = chest().astype(np.float32) / 4.0
    ds = _float_dx(values, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=700)
    ds.WindowWidth = 900
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "window_linear"
    modality = values.astype(np.float64) * 2 - 100
    assert np.array_equal(out, _to_8bit(_linear(modality, 700, 900)))


def test_32_bit_integer_pixels_are_displayed():
    values = chest().astype(np.uint32) * 1000 + 70_000  # past any 16-bit table
    ds = make_dx(np.zeros(values.shape, np.uint16), WindowCenter=2_000_000, WindowWidth=3e6)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = values.astype("<u4").tobytes()
    out, extra = _pixels(to_bytes(ds))
    assert extra["conversion"]["voi"] == "window_linear"
    assert np.array_equal(out, _to_8bit(_linear(values, 2_000_000, 3e6)))


# ----------------------------------------------------------------------------- colour


def _rgb16(rgb: np.ndarray, bits_stored: int = 12) -> Dataset:
    ds = make_dx(rgb[..., 0].astype(np.uint16), bits_stored=bits_stored)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.astype("<u2").tobytes()
    return ds


def test_16_bit_colour_is_scaled_by_its_stored_bits():
    y, x = np.mgrid[0:32, 0:40]
    rgb = np.stack([x * 100, y * 120, 4000 - x * 90], axis=-1).astype(np.uint16)  # <= 4000
    out, extra = _pixels(to_bytes(_rgb16(rgb)), RGB)
    assert np.array_equal(out, np.rint(rgb * (255.0 / 4095.0)).astype(np.uint8))
    assert {k: extra["conversion"][k] for k in ("colour", "voi", "inverted")} == {
        "colour": "RGB",
        "voi": "none",
        "inverted": False,
    }


def test_colour_scaling_helper():
    arr = np.array([[[0, 2048, 4095]], [[5000, 100, 1]]], np.uint16)
    ds = Dataset()
    ds.BitsStored = 12
    # a value past the stored range sets the scale; else the stored range does
    np.testing.assert_array_equal(
        _colour_to_uint8(arr, ds), np.rint(arr * (255.0 / 5000.0)).astype(np.uint8)
    )
    np.testing.assert_array_equal(
        _colour_to_uint8(arr[:1], ds), np.rint(arr[:1] * (255.0 / 4095.0)).astype(np.uint8)
    )
    no_bits = _colour_to_uint8(arr, Dataset())  # Bits Stored absent: the 16-bit range
    np.testing.assert_array_equal(no_bits, np.rint(arr * (255.0 / 65535.0)).astype(np.uint8))
    eight = Dataset()
    eight.BitsStored = 8  # 8 bits stored in 16: black stays black, 255 is white
    np.testing.assert_array_equal(
        _colour_to_uint8(np.array([[[0, 128, 255]]], np.uint16), eight), [[[0, 128, 255]]]
    )
    small = np.array([[[3, 200, 255]]], np.uint8)
    assert _colour_to_uint8(small, ds) is small  # 8-bit data is kept as it is


def _palette_expected(ds: Dataset) -> np.ndarray:
    """A palette image by hand: each index through the three 16-bit LUTs (inputs below the
    first mapped value take entry 0), entries over their 16-bit range onto 8 bits."""
    index = ds.pixel_array.astype(np.int64)
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    channels = []
    for colour in ("Red", "Green", "Blue"):
        table = np.frombuffer(getattr(ds, f"{colour}PaletteColorLookupTableData"), "<u2")
        assert int(getattr(ds, f"{colour}PaletteColorLookupTableDescriptor")[2]) == 16
        entries = table.astype(np.float64)[np.clip(index - first, 0, len(table) - 1)]
        channels.append(np.rint(entries * (255.0 / 65535.0)))
    return np.stack(channels, axis=-1).astype(np.uint8)


@pytest.mark.parametrize("darken", [1, 4])
def test_palette_colour_goes_through_its_lookup_tables(darken):
    """examples_palette.dcm (8-bit indices, 16-bit LUTs), and the same with every LUT entry
    divided by 4: a dark palette stays dark (the 16-bit range sets the scale, not the
    brightest colour the image happens to use)."""
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm", download=False))
    for colour in ("Red", "Green", "Blue"):
        keyword = f"{colour}PaletteColorLookupTableData"
        table = np.frombuffer(getattr(ds, keyword), "<u2") // darken
        setattr(ds, keyword, table.astype("<u2").tobytes())
    buffer = io.BytesIO()
    ds.save_as(buffer)
    out, extra = _pixels(buffer.getvalue(), RGB)
    assert extra["conversion"]["colour"] == "RGB"
    expected = _palette_expected(ds)
    assert np.array_equal(out, expected)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 50  # a colour picture, not one tint
    assert out.max() == (254 if darken == 1 else 64)  # 0xFF00 and 0x3FC0 at most


def test_unsupported_colour_layouts_are_named():
    rgb = np.stack([chest() % 256] * 3, axis=-1).astype(np.uint8)
    ds = make_dx(rgb[..., 0].astype(np.uint16))
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = rgb.tobytes()
    ds.PhotometricInterpretation = "HSV"
    assert _error(to_bytes(ds)).reason == "unsupported colour layout HSV"
    grey = make_dx(chest())
    grey.PhotometricInterpretation = "HSV"
    assert _error(to_bytes(grey)).reason == "unsupported photometric interpretation 'HSV'"


# ----------------------------------------------------------------------------- bits


def test_clean_unused_bits_masks_unsigned_and_sign_extends_signed_values():
    raw = np.array([0x0FFF, 0xA123, 0x0800, 0xF7FF], np.uint16)  # garbage above bit 11
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation = 12, 0
    masked = _clean_unused_bits(raw, ds)
    assert masked.dtype == np.uint16 and masked.tolist() == [0x0FFF, 0x0123, 0x0800, 0x07FF]
    ds.PixelRepresentation = 1
    signed = _clean_unused_bits(raw.view(np.int16), ds)
    assert signed.dtype == np.int16 and signed.tolist() == [-1, 0x123, -2048, 2047]
    assert _clean_unused_bits(raw, ds).tolist() == [-1, 0x123, -2048, 2047]  # unsigned input


def test_clean_unused_bits_leaves_full_width_and_unknown_widths_alone():
    raw = np.array([0xFFFF, 0x8001, 3], np.uint16)
    for bits_stored in (16, None):
        ds = Dataset()
        if bits_stored is not None:
            ds.BitsStored = bits_stored
        ds.PixelRepresentation = 0
        out = _clean_unused_bits(raw, ds)
        assert out.dtype == np.uint16 and out.tolist() == [0xFFFF, 0x8001, 3]
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation = 1, 0  # one bit of eight
    assert _clean_unused_bits(np.array([0, 1, 2, 255], np.uint8), ds).tolist() == [0, 1, 0, 1]
    floats = np.array([0.5, -2.0], np.float32)
    ds.BitsStored = 8
    assert _clean_unused_bits(floats, ds) is floats


# ----------------------------------------------------------------------------- headers, errors


def test_single_frame_conversion_says_one_frame():
    _, extra = _pixels(to_bytes(make_dx(chest(), WindowCenter=2000, WindowWidth=4000)))
    assert extra["conversion"]["frames"] == 1 and extra["conversion"]["frame"] == 0
    assert "NumberOfFrames" not in extra


def test_fields_keep_lists_drop_empty_values_and_survive_a_malformed_element():
    ds = make_dx(chest())
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.BodyPartExamined = ""
    fields = dicom_fields(ds)
    assert fields["ImageType"] == ["ORIGINAL", "AXIAL"]
    assert "BodyPartExamined" not in fields
    assert fields["Rows"] == 60 and type(fields["Rows"]) is int
    assert fields["PixelRepresentation"] == 0
    # BitsAllocated with 3 bytes cannot be read: left out, and the fields after it still come
    tag = Tag(0x00280100)
    ds[tag] = RawDataElement(tag, "US", 3, b"\x10\x00\x01", 0, False, True)
    fields = dicom_fields(ds)
    assert "BitsAllocated" not in fields
    assert fields["BitsStored"] == 12 and fields["ViewPosition"] == "AP"


def test_plain_values_are_json_types():
    assert _plain(True) == 1 and type(_plain(True)) is int
    assert _plain(7) == 7 and _plain(2.5) == 2.5 and _plain(" AP ") == "AP"
    assert _plain(["a", "", None, 3]) == ["a", 3]
    assert _plain(b"raw") is None and _plain(Dataset()) is None and _plain(None) is None


def test_for_processing_sop_class_alone_is_skipped():
    ds = make_dx(chest(), sop_class=DX_PROCESSING)
    del ds.PresentationIntentType
    err = _error(to_bytes(ds))
    assert err.reason == "DICOM is For Processing (raw detector data), skipped"
    _, extra = _pixels(to_bytes(ds), skip_for_processing=False)
    assert "PresentationIntentType" not in extra


@pytest.mark.filterwarnings("ignore:Expected implicit VR")  # the broken file below
def test_read_errors_say_what_failed(tmp_path):
    err = _error(str(tmp_path))  # a folder: not readable as a file
    assert err.reason.startswith("cannot read DICOM file (") and "Is a directory" in err.reason
    cr = to_bytes(make_dx(chest()))
    err = _error(gzip.compress(cr)[:60])
    assert err.reason.startswith("corrupt or truncated gzip (") and len(err.reason) > 30
    assert "ended before the end-of-stream marker" in err.reason
    no_pixels = make_dx(chest())
    del no_pixels.PixelData
    assert _error(to_bytes(no_pixels)).reason == "not a DICOM image (no pixel data)"
    truncated = cr[:-100]
    err = _error(truncated)
    assert err.reason.startswith("cannot decode DICOM pixel data (") and err.reason.endswith(")")
    assert len(err.reason) > len("cannot decode DICOM pixel data ()") + 10
    bad_vr = bytearray(cr)
    assert bad_vr[128:138] == b"DICM\x02\x00\x00\x00UL"  # (0002,0000) UL opens the meta
    bad_vr[136:138] = b"QQ"
    err = _error(bytes(bad_vr))
    assert err.reason == (
        "not a readable DICOM file (Unknown Value Representation 'QQ' in tag (0002,0000))"
    )


def test_one_line_collapses_whitespace_and_names_silent_errors():
    assert _one_line(ValueError("bad\n  value\tin   file")) == "bad value in file"
    assert _one_line(KeyError()) == "KeyError"
    assert _one_line(OSError("   ")) == "OSError"
    long = _one_line(RuntimeError("x" * 1000))
    assert long == "x" * 300
