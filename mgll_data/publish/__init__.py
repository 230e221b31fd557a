"""What happens to a finished build: its card and figures, validation, merge, export, Hub push."""
