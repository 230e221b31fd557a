"""The dataset card (`README.md`): a YAML header derived from the schema, then sections for people.

Generated, never hand-written, and deterministic: no timestamps and no paths of the building
machine, so a rebuild gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..build.pipeline import Pipeline
from ..build.writer import ShardPlan, ShardStats
from ..record import SPLITS
from ..schema import RecordSchema, schema_of_block
from ..vocab import Vocabulary

if TYPE_CHECKING:
    from .figures import Summary

# Licence ids the Hugging Face Hub knows; anything else is published as `other` with a name.
_HUB_LICENSES = {
    "cc0-1.0",
    "cc-by-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "cc-by-sa-4.0",
    "apache-2.0",
    "mit",
    "odbl",
    "pddl",
}
_TEXT_KINDS = {
    "labels": "label-only: all three texts are derived from the release's labels and the "
    "vocabulary, so they add little beyond the labels themselves",
    "report": "report-based: the description and explanation come from the radiology report",
    "dicom": "DICOM-derived: the description is the study description and the explanation is "
    "composed from the series description, view, modality and body part in the DICOM header",
}


def card_header(
    pipeline: Pipeline,
    mgll_block: dict[str, Any],
    plans: Sequence[ShardPlan],
    stats: Sequence[ShardStats],
) -> dict[str, Any]:
    """The card's YAML header: licence, tags, explicit data files, features, splits, `mgll`."""
    schema = schema_of_block(mgll_block)
    licence = pipeline.license
    header: dict[str, Any] = {"pretty_name": pipeline.raw.get("pretty_name", pipeline.name)}
    licence_id = str(licence.get("id", "other")).lower()
    if licence_id in _HUB_LICENSES:
        header["license"] = licence_id
    else:
        header.update(
            license="other",
            license_name=str(licence.get("id", "other")),
            license_link=licence.get("url", ""),
        )
    header["task_categories"] = [
        "zero-shot-image-classification",
        "image-classification",
        "image-to-text",
    ]
    header["tags"] = ["medical", "mgll", "multi-label", "multi-granular", mgll_block["domain"]]
    splits = [s for s in SPLITS if any(p.split == s for p in plans)]
    header["configs"] = [
        {
            "config_name": "default",
            "data_files": [
                {"split": s, "path": [f"data/{p.name}" for p in plans if p.split == s]}
                for s in splits
            ],
        }
    ]
    per_split = {
        s: [st for p, st in zip(plans, stats, strict=True) if p.split == s] for s in splits
    }
    sizes = {s: sum(st.num_bytes for st in per_split[s]) for s in splits}
    header["dataset_info"] = {
        "features": schema.card_features(),
        "splits": [
            {"name": s, "num_bytes": sizes[s], "num_examples": sum(st.rows for st in per_split[s])}
            for s in splits
        ],
        "download_size": sum(sizes.values()),
        "dataset_size": sum(sizes.values()),
    }
    header["mgll"] = mgll_block
    return header


def prevalence_table(
    label_names: Sequence[str], counts: dict[str, tuple[Sequence[int], Sequence[int]]]
) -> list[str]:
    """Markdown rows of positives / annotated rows (and their share) per label and split;
    `counts` maps each split, in column order, to (positives per label, annotated per label).
    A label no row of a split annotates reads "not annotated", never 0 %."""
    lines = ["| label | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for k, name in enumerate(label_names):
        cells = []
        for positives, annotated in counts.values():
            p, a = positives[k], annotated[k]
            cells.append(f"{p} / {a} ({p / a:.1%})" if a else "not annotated")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _prevalence_table(
    vocab: Vocabulary, plans: Sequence[ShardPlan], stats: Sequence[ShardStats]
) -> list[str]:
    """The prevalence table of a build, from the statistics its shard writers kept."""
    counts = {}
    for split in (s for s in SPLITS if any(p.split == s for p in plans)):
        chosen = [st for p, st in zip(plans, stats, strict=True) if p.split == split]
        counts[split] = (
            [sum(col) for col in zip(*(st.label_positive for st in chosen), strict=True)],
            [sum(col) for col in zip(*(st.label_annotated for st in chosen), strict=True)],
        )
    return prevalence_table(vocab.names, counts)


def render_card(
    pipeline: Pipeline,
    vocab: Vocabulary,
    mgll_block: dict[str, Any],
    plans: Sequence[ShardPlan],
    stats: Sequence[ShardStats],
    extra: Sequence[str] = (),
) -> str:
    """The whole card as text; `extra` lines (sections from the shards) go before Columns."""
    header = card_header(pipeline, mgll_block, plans, stats)
    schema = schema_of_block(mgll_block)
    kind = pipeline.texts.kind
    rows = {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]}
    notice = _card_settings(pipeline).get("notice")
    body = [
        f"# {header['pretty_name']}",
        "",
        *([f"> {notice}", ""] if notice else []),
        pipeline.description,
        "",
        f"Built with `mgll-build-dataset` (pipeline `{pipeline.name}`, record schema "
        f"v{mgll_block['schema_version']}, vocabulary `{vocab.domain}` {vocab.version}). "
        "One row per image, with a multi-label vector and texts at three granularities.",
        "",
        "## Splits",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {s} | {n} |" for s, n in rows.items()],
        "",
        "## Texts",
        "",
        f"This dataset is {_TEXT_KINDS.get(kind, kind)}.",
        "",
        "- `text_category`: the positive labels in vocabulary order, `Possible ...` for uncertain"
        " ones, or `No Finding`.",
        "- `text_description`: the diagnostic description.",
        "- `text_explanation`: the clinical explanation.",
        "- `text_origin`: which rule produced each of the three texts.",
        "",
        "## Labels",
        "",
        "`labels` holds one value per label in the order of `mgll.label_names` in the header: "
        "1 positive, 0 negative, -1 uncertain, NaN not mentioned. Labels the source never "
        "annotates (not in `mgll.annotated_labels`) are NaN throughout. Positives / annotated "
        "rows per split:",
        "",
        *_prevalence_table(vocab, plans, stats),
        "",
        *extra,
        *_columns_use_and_licence(pipeline, schema),
    ]
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=100)
    return "---\n" + front + "---\n\n" + "\n".join(body)


def _card_settings(pipeline: Pipeline) -> dict[str, str]:
    """The pipeline's optional `card:` block. A synthetic dataset (the demos) sets `notice`, a
    sentence shown under the title, and `rebuild`, the command that regenerates it; it then has
    no source release to cite or rebuild from."""
    return {str(k): str(v) for k, v in (pipeline.raw.get("card") or {}).items()}


def _citation_and_rebuild(pipeline: Pipeline) -> list[str]:
    """What to cite and how to rebuild: the source release's, or a synthetic dataset's own."""
    settings = _card_settings(pipeline)
    if "rebuild" in settings:
        return [
            "This dataset is synthetic: there is no source release to cite.",
            "",
            "## Regenerate",
            "",
            "```",
            settings["rebuild"],
            "```",
        ]
    return [
        "Cite the original release:",
        "",
        "```",
        str(pipeline.license.get("citation", "")).strip(),
        "```",
        "",
        "## Rebuild from the raw release",
        "",
        "```",
        f"mgll-build-dataset build {pipeline.name} --root RAW --out OUT",
        "```",
    ]


def _columns_use_and_licence(pipeline: Pipeline, schema: RecordSchema) -> list[str]:
    """The card's closing sections: the columns, how to load it, licence, how to rebuild."""
    licence = pipeline.license
    return [
        "## Columns",
        "",
        "| column | meaning |",
        "|---|---|",
        *[f"| `{c.name}` | {c.doc} |" for c in schema.columns],
        "",
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/or/repo-id")',
        "```",
        "",
        "## Licence and citation",
        "",
        f"Licence: {licence.get('id')} ({licence.get('url', '')}); redistribution: "
        f"{licence.get('redistribution')}.",
        "",
        *_citation_and_rebuild(pipeline),
        "",
        "`_build/manifest.json` beside the data records the exact options, library versions and"
        " input hashes of this build.",
        "",
    ]


def write_card(
    out: Path,
    pipeline: Pipeline,
    vocab: Vocabulary,
    mgll_block: dict[str, Any],
    plans: Sequence[ShardPlan],
    stats: Sequence[ShardStats],
) -> None:
    """Write `out/README.md` (and `out/figures/*.png`), reading the finished shards in `out`."""
    extra = shard_sections(Path(out), list(mgll_block["label_names"]))
    text = render_card(pipeline, vocab, mgll_block, plans, stats, extra)
    (Path(out) / "README.md").write_text(text, encoding="utf-8")


# Sections that show rows or images of the data: left out of a card published without data.
DATA_SECTIONS = ("Figures", "Example rows")


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """A card's YAML header (parsed) and its body."""
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise ValueError("card has no YAML header between '---' lines")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5 :]


def _drop_sections(body: str, titles: Sequence[str]) -> str:
    kept: list[str] = []
    skipping = False
    for line in body.split("\n"):
        if line.startswith("## "):
            skipping = line[3:].strip() in titles
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def card_only_text(text: str) -> str:
    """The card published by `push --card-only`: no data files, figures or example rows.

    The header keeps the licence, tags and the `mgll` block but drops `configs` and
    `dataset_info` (there are no data files to point at); the body says why there is no data
    and keeps the rebuild recipe.
    """
    header, body = split_card(text)
    header = {k: v for k, v in header.items() if k not in ("configs", "dataset_info")}
    body = _drop_sections(body, DATA_SECTIONS)
    lines = body.split("\n")
    insert = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    note = [
        "## No data in this repository",
        "",
        "The licence of the source release does not allow redistribution, so this repository "
        "holds only this card. Get the raw release from its provider under its terms and "
        "rebuild the dataset locally with the recipe in *Rebuild from the raw release* below.",
        "",
    ]
    body = "\n".join(lines[:insert] + note + lines[insert:])
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=100)
    return "---\n" + front + "---\n" + body


def shard_sections(out: Path, label_names: list[str]) -> list[str]:
    """Sections computed from the shards: figures, text lengths, example rows."""
    from .figures import summarise

    if not any((out / "data").rglob("*.parquet")):
        return []
    return summary_sections(out, summarise(out, label_names))


def summary_sections(out: Path, summary: Summary) -> list[str]:
    """The figures (drawn into `out/figures/`), text lengths and example rows of `summary`."""
    from .figures import CONTEXT, text_length_table, write_figures

    lines: list[str] = []
    figures = write_figures(out, summary)
    if figures:
        captions = {
            "figures/label_prevalence.png": "Label prevalence",
            "figures/label_cooccurrence.png": "Label co-occurrence",
            "figures/sample_images.png": "Sample images",
        }
        lines += ["## Figures", ""]
        for path in figures:
            lines += [f"![{captions.get(path, path)}]({path})", ""]
    lines += [
        "## Text lengths",
        "",
        f"Per granularity; tokens approximate open_clip's CLIP tokenizer (context {CONTEXT}, "
        "start and end tokens included; see `mgll_data/publish/figures.py`).",
        "",
        *text_length_table(summary),
        "",
    ]
    if summary.examples:
        lines += ["## Example rows", ""]
        for row in summary.examples:
            lines += [
                f"- `{row['id']}` ({row['split']}): positive labels "
                f"{', '.join(row['positive_labels']) or 'none'}",
                f"  - category: {row['text_category']}",
                f"  - description: {row['text_description']}",
                f"  - explanation: {row['text_explanation']}",
            ]
        lines.append("")
    return lines
