"""PadChest's list cells (`Labels`, `Localizations`, `LabelsLocalizationsBySentence`) read safely,
and the English description written from the labels and localizations of each report sentence.

The release writes these cells as Python list literals (`['pleural effusion', 'loc left']`,
`[['normal'], ['normal']]`). They are read with `ast.literal_eval` only, never run. Its writer
(pandas) put a bare `nan` where a sentence or a whole row had no labels: that name reads as an
empty list. By sentence, physician-labelled rows give a list of lists (one per sentence) and
the network's rows one flat list, each label followed by its localizations, grouped here one
label per group. A cell over `MAX_CELL_CHARS`, one that is no literal, or one of another shape
raises `CellError` with the reason, and the source quarantines its image.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from typing import NoReturn

from ..text.templates import join_phrases

# The longest real cell is 758 characters; a hostile one could make the parser build a huge tree.
MAX_CELL_CHARS = 10_000
LOCALIZATION_PREFIX = "loc "
# Annotation markers, not findings: a sentence marked `exclude` says nothing about the image.
NOT_DESCRIBED = frozenset({"exclude"})


class CellError(ValueError):
    """A cell that cannot be read as the list it should be; `reason` says why, in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _NanAsEmpty(ast.NodeTransformer):
    """The bare name `nan` (pandas' missing value) as an empty list literal."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id == "nan":
            return ast.copy_location(ast.List(elts=[], ctx=ast.Load()), node)
        return node


def literal_list(cell: str, column: str) -> list:
    """The cell as a Python list (`nan` read as []); CellError when it is not one."""
    text = str(cell).strip()
    if len(text) > MAX_CELL_CHARS:
        raise CellError(f"{column} cell is {len(text):,} characters (over {MAX_CELL_CHARS:,})")
    try:
        value = ast.literal_eval(text)
    except ValueError:
        # the rare cell with a bare `nan`: only then is the tree rewritten (slow in Python)
        value = _literal_with_nan(text, column) if "nan" in text else _refuse(text, column)
    except (SyntaxError, TypeError, MemoryError, RecursionError):
        _refuse(text, column)
    if not isinstance(value, list):
        raise CellError(f"{column} cell {_preview(text)} is not a list")
    return value


def _literal_with_nan(text: str, column: str) -> object:
    try:
        return ast.literal_eval(_NanAsEmpty().visit(ast.parse(text, mode="eval")))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        _refuse(text, column)


def _refuse(text: str, column: str) -> NoReturn:
    raise CellError(f"{column} cell {_preview(text)} is not a list literal") from None


def string_list(cell: str, column: str) -> tuple[str, ...]:
    """A list of strings: stripped, blanks dropped, each kept once in the order given."""
    value = literal_list(cell, column)
    if not all(isinstance(entry, str) for entry in value):
        raise CellError(f"{column} cell {_preview(str(cell))} is not a list of strings")
    return _clean(value)


def sentence_lists(cell: str, column: str) -> tuple[tuple[str, ...], ...]:
    """The labels and localizations by report sentence, each cleaned as `string_list`.

    Physician-labelled rows give a list of lists of strings, one per sentence. The network's
    rows give one flat list, each label followed by its localizations: it is grouped so, one
    label per group.
    """
    value = literal_list(cell, column)
    if all(isinstance(entry, str) for entry in value):
        return _groups([entry.strip() for entry in value])
    if not all(
        isinstance(sentence, list) and all(isinstance(entry, str) for entry in sentence)
        for sentence in value
    ):
        raise CellError(f"{column} cell {_preview(str(cell))} is not a list of lists of strings")
    return tuple(_clean(sentence) for sentence in value)


def _groups(entries: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """A flat list cut before each label, so each localization stays with the label before it
    (an empty label, which the release writes, starts a group too: its places name nothing)."""
    groups: list[list[str]] = []
    for entry in entries:
        if not groups or not entry.startswith(LOCALIZATION_PREFIX):
            groups.append([])
        groups[-1].append(entry)
    return tuple(_clean(group) for group in groups)


def describe_sentences(sentences: Iterable[Sequence[str]]) -> str:
    """One English sentence per report sentence: its findings and, in brackets, where they are.

    `[['pleural effusion', 'loc left', 'loc basal']]` gives `Pleural effusion (left, basal).`
    Sentences without a finding, or only `exclude`, are left out, and a repeated one is
    written once.
    """
    written: dict[str, None] = {}
    for sentence in sentences:
        findings = [
            e for e in sentence if not e.startswith(LOCALIZATION_PREFIX) and e not in NOT_DESCRIBED
        ]
        if not findings:
            continue
        places = [
            e[len(LOCALIZATION_PREFIX) :] for e in sentence if e.startswith(LOCALIZATION_PREFIX)
        ]
        text = join_phrases(findings) + (f" ({', '.join(places)})" if places else "")
        written[text[:1].upper() + text[1:] + "."] = None
    return " ".join(written)


def _clean(entries: Iterable[str]) -> tuple[str, ...]:
    # The release pads some labels with a space (' pneumonia') and leaves empty strings.
    return tuple(dict.fromkeys(e.strip() for e in entries if e.strip()))


def _preview(text: str, length: int = 40) -> str:
    return repr(text[:length] + ("…" if len(text) > length else ""))
