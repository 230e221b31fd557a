"""mgll_train: train open_clip models with the MGLL objective on mgll datasets."""

__version__ = "0.1.0"
