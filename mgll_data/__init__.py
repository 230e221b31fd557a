"""mgll_data: build multi-granular medical image-text datasets from raw public releases."""

__version__ = "0.1.0"
