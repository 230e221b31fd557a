"""The image stages: raster images (decode, normalise, resize, encode) and DICOM."""
