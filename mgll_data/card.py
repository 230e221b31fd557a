"""The dataset card (`README.md`): a YAML header derived from the schema, then sections for people.

Generated, never hand-written, and deterministic: no timestamps and no paths of the building
machine, so a rebuild gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .pipeline import Pipeline
from .schema import SPLITS, record_schema
from .vocab import Vocabulary
from .writer import ShardPlan, ShardStats

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
}


def card_header(
    pipeline: Pipeline,
    mgll_block: dict[str, Any],
    plans: Sequence[ShardPlan],
    stats: Sequence[ShardStats],
) -> dict[str, Any]:
    """The card's YAML header: licence, tags, explicit data files, features, splits, `mgll`."""
    schema = record_schema(len(mgll_block["label_names"]))
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


def _prevalence_table(
    vocab: Vocabulary, plans: Sequence[ShardPlan], stats: Sequence[ShardStats]
) -> list[str]:
    splits = [s for s in SPLITS if any(p.split == s for p in plans)]
    lines = ["| label | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for k, name in enumerate(vocab.names):
        cells = []
        for split in splits:
            chosen = [st for p, st in zip(plans, stats, strict=True) if p.split == split]
            annotated = sum(st.label_annotated[k] for st in chosen)
            positive = sum(st.label_positive[k] for st in chosen)
            cells.append(f"{positive} / {annotated}" if annotated else "not annotated")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render_card(
    pipeline: Pipeline,
    vocab: Vocabulary,
    mgll_block: dict[str, Any],
    plans: Sequence[ShardPlan],
    stats: Sequence[ShardStats],
) -> str:
    """The whole card as text."""
    header = card_header(pipeline, mgll_block, plans, stats)
    schema = record_schema(len(vocab))
    licence = pipeline.license
    kind = pipeline.section("texts").get("kind", "labels")
    rows = {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]}
    body = [
        f"# {header['pretty_name']}",
        "",
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
        "Cite the original release:",
        "",
        "```",
        str(licence.get("citation", "")).strip(),
        "```",
        "",
        "## Rebuild from the raw release",
        "",
        "```",
        f"mgll-build-dataset build {pipeline.name} --root RAW --out OUT",
        "```",
        "",
        "`_build/manifest.json` beside the data records the exact options, library versions and"
        " input hashes of this build.",
        "",
    ]
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=100)
    return "---\n" + front + "---\n\n" + "\n".join(body)


def write_card(
    out: Path,
    pipeline: Pipeline,
    vocab: Vocabulary,
    mgll_block: dict[str, Any],
    plans: Sequence[ShardPlan],
    stats: Sequence[ShardStats],
) -> None:
    """Write `out/README.md`."""
    text = render_card(pipeline, vocab, mgll_block, plans, stats)
    (Path(out) / "README.md").write_text(text, encoding="utf-8")
