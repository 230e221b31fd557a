"""pydicom's warnings and log records never repeat a value or path read from a DICOM file."""

from __future__ import annotations

import io
import logging
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from mgll_data import phi_warnings
from mgll_data.cli import main

SECRET = "DOE.JOHN.19570304"  # a "UID" that carries a name and a birth date


def _dicom_with_bad_uid() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = SECRET
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:/data/")  # the other module's warning, passed through
def test_a_real_pydicom_warning_is_reworded_once(monkeypatch, caplog):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    written: list[str] = []
    phi_warnings.install(written.append)
    data = _dicom_with_bad_uid()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="pydicom"):
        warnings.simplefilter("always")
        for _ in range(3):  # the same warning, shown once
            pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID  # noqa: B018
        warnings.warn_explicit(f"/data/{SECRET}/1.dcm", UserWarning, "elsewhere.py", 1)
    assert written == ["warning: DICOM reader: Invalid value for VR UI: …. Please see … for "
                       "allowed values for each VR.\n"]  # fmt: skip
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("pydicom")]
    assert logged and all(SECRET not in m and "Invalid value for VR UI" in m for m in logged)
    for logger in ("pydicom", "gdcm"):
        assert sum(isinstance(f, phi_warnings._Reworded) for f in logging.getLogger(logger).filters)


@pytest.mark.parametrize(
    "message, expected",
    [
        ("length (86) exceeds 64", "length (…) exceeds …"),
        ("in /data/Smith_John/s1.dcm, read", "in … read"),
        ('value "DOE^JANE" for PN', "value … for PN"),
    ],
)
def test_reword_removes_values_paths_and_numbers(message, expected):
    assert phi_warnings.reword(message) == expected


def test_the_cli_installs_it_before_running(monkeypatch, capsys):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    before = warnings.showwarning
    with pytest.raises(SystemExit):
        main(["list"])
    installed = warnings.showwarning
    assert installed is not before and installed.rewords_dicom_warnings
    with pytest.raises(SystemExit):
        main(["list"])
    assert warnings.showwarning is installed  # once, however often the CLI runs
    capsys.readouterr()
