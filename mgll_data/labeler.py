"""The report labeler's public import path; it lives in `mgll_data.text.labeler`."""

from .text.labeler import TextLabeler, default_labeler

__all__ = ["TextLabeler", "default_labeler"]
