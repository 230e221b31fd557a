"""Text mining of reports: sectioning, label extraction (the labeler), label-only text templates."""
