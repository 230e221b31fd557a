"""`merge`: combine built datasets of one domain into one dataset folder.

Inputs must agree on the `mgll` block's schema_version (1 and 2 are compatible), domain,
vocab_version, label_names and optional columns (so K and the label order are the same and the
shards concatenate). Shards are copied byte for
byte to `data/{source}/{shard}`, so each keeps its own Parquet `mgll` metadata (with that source's
`annotated_labels`). The card gets one config per source plus a `default` config of all, and its
`mgll` block holds the union of `annotated_labels` plus, under `sources`, each source's own
`annotated_labels` and licence. `_build/manifest.json` lists every source's licence (for `push`)
and every shard's sha256.
"""

from __future__ import annotations

import copy
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from ..build.lock import LOCK_NAME, folder_lock
from ..build.writer import file_sha256, write_json
from ..errors import UserError
from ..record import COMPATIBLE_SCHEMA_VERSIONS, OPTIONAL_COLUMNS_KEY, SPLITS, read_mgll_metadata
from ..safe_names import safe_path_component
from ..schema import schema_of_block
from .card import _HUB_LICENSES, _TEXT_KINDS, prevalence_table, summary_sections
from .figures import Summary, summarise
from .hub import read_manifest
from .inspect import read_card_header, verify_shards

MUST_AGREE = ("schema_version", "domain", "vocab_version", "label_names")


def _source_of(path: Path, manifest: dict[str, Any]) -> str:
    if "merged_from" in manifest:
        raise UserError(f"{path}: is itself a merge; merge the original builds instead")
    name = str(manifest.get("pipeline") or "")
    return safe_path_component(name, f"{path}: the manifest's pipeline name")


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} names starting {value[:3]}"
    return repr(value)


def check_compatible(blocks: dict[Path, dict[str, Any]]) -> None:
    """Refuse, in one line naming both datasets, when two `mgll` blocks cannot be merged."""
    items = list(blocks.items())
    first_path, first = items[0]
    for path, block in items[1:]:
        for key in (*MUST_AGREE, OPTIONAL_COLUMNS_KEY):  # one schema: the same optional columns
            if key == "schema_version":
                versions = {block.get(key), first.get(key)}
                if versions <= set(COMPATIBLE_SCHEMA_VERSIONS):
                    continue  # v2 only added optional columns, compared just below
            if block.get(key) != first.get(key):
                raise UserError(
                    f"cannot merge {first_path} and {path}: {key} differs "
                    f"({_describe(first.get(key))} vs {_describe(block.get(key))})"
                )


def merge(inputs: list[Path], out: Path, overwrite: bool = False) -> list[str]:
    """Merge the datasets `inputs` into `out`; return summary lines.

    Holds each input's lock as a reader and `out`'s as a writer for the whole merge.
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if out.resolve() in {p.resolve() for p in inputs}:
        raise UserError(f"{out}: the merge output may not be one of its inputs")
    with ExitStack() as locks:
        for path in inputs:
            locks.enter_context(folder_lock(path, shared=True))
        locks.enter_context(folder_lock(out))
        return _merge(inputs, out, overwrite)


def _merge(inputs: list[Path], out: Path, overwrite: bool) -> list[str]:
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if len(inputs) < 2:
        raise UserError("merge needs at least two datasets")
    loaded, blocks = _load_inputs(inputs)
    check_compatible(blocks)  # before anything else: the one-line refusal names both datasets
    sources: dict[str, dict[str, Any]] = {}
    for name, path, manifest in loaded:
        config = manifest.get("config") or {}
        sources[name] = {
            "path": path,
            "mgll": blocks[path],
            "shards": _verified_shards(path, manifest, blocks[path]),
            "license": config.get("license") or {},
            "pretty_name": config.get("pretty_name", name),
            "text_kind": (config.get("texts") or {}).get("kind", "labels"),
            "fingerprint": manifest.get("fingerprint"),
        }
    _clear_output(out, overwrite)
    manifest_shards = _copy_shards(sources, out)
    (out / "README.md").write_text(render_merged_card(sources, out), encoding="utf-8")
    write_json(
        out / "_build" / "manifest.json",
        {
            "complete": True,
            "merged_from": [
                {"source": n, "fingerprint": s["fingerprint"], "license": s["license"]}
                for n, s in sorted(sources.items())
            ],
            "licenses": [s["license"] for _, s in sorted(sources.items())],
            "shards": manifest_shards,
            "card_sha256": file_sha256(out / "README.md"),
        },
    )
    rows = sum(s["rows"] for s in manifest_shards)
    return [
        f"merged {len(sources)} datasets ({', '.join(sorted(sources))}) into {out}: "
        f"{rows} rows in {len(manifest_shards)} shards"
    ]


def _load_inputs(
    inputs: list[Path],
) -> tuple[list[tuple[str, Path, dict[str, Any]]], dict[Path, dict[str, Any]]]:
    """Each input's source name, path and manifest, and its card's `mgll` block."""
    blocks: dict[Path, dict[str, Any]] = {}
    loaded: list[tuple[str, Path, dict[str, Any]]] = []
    for path in inputs:
        manifest = read_manifest(path)
        header = read_card_header(path)
        name = _source_of(path, manifest)
        if name in {n for n, _, _ in loaded}:
            other = next(p for n, p, _ in loaded if n == name)
            raise UserError(
                f"cannot merge {other} and {path}: both are source {name!r} "
                "(their ids would collide)"
            )
        if not header.get("mgll"):
            raise UserError(f"{path / 'README.md'}: no 'mgll' block in the YAML header")
        blocks[path] = header["mgll"]
        loaded.append((name, path, manifest))
    return loaded, blocks


def _verified_shards(
    path: Path, manifest: dict[str, Any], mgll: dict[str, Any]
) -> list[dict[str, Any]]:
    """The build's shards, each checked against the manifest's hash and the card's block."""
    shards = []
    verify_shards(path, manifest)
    for entry in manifest.get("shards", []):
        shard = path / entry["path"]
        try:
            meta = read_mgll_metadata(pq.read_schema(shard), str(shard))
        except ValueError as err:
            raise UserError(str(err)) from None
        if meta != mgll:
            raise UserError(f"{shard}: 'mgll' metadata differs from {path}'s card")
        shards.append({**entry, "local": shard, "split": shard.name.split("-", 1)[0]})
    if not shards:
        raise UserError(f"{path}: no shards in the manifest")
    return shards


def _clear_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless `overwrite`; then remove what a merge writes there."""
    if out.exists() and any(c.name != LOCK_NAME for c in out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: exists and is not empty; use --overwrite to replace it")
        for child in ("data", "_build", "figures", "README.md"):
            target = out / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (out / "_build").mkdir(parents=True, exist_ok=True)


def _copy_shards(sources: dict[str, dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Copy each source's shards byte for byte to data/{source}/; return the manifest entries."""
    manifest_shards = []
    for name, source in sorted(sources.items()):
        (out / "data" / name).mkdir(parents=True, exist_ok=True)
        for shard in source["shards"]:
            rel = f"data/{name}/{shard['local'].name}"
            shutil.copyfile(shard["local"], out / rel)
            shard["rel"] = rel
            shard["rows"] = pq.ParquetFile(out / rel).metadata.num_rows
            shard["num_bytes"] = (out / rel).stat().st_size
            manifest_shards.append({"path": rel, "rows": shard["rows"], "sha256": shard["sha256"]})
    return manifest_shards


def _splits_of(shards: list[dict[str, Any]]) -> list[str]:
    return [s for s in SPLITS if any(sh["split"] == s for sh in shards)]


def _config(name: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "config_name": name,
        "data_files": [
            {"split": split, "path": [sh["rel"] for sh in shards if sh["split"] == split]}
            for split in _splits_of(shards)
        ],
    }


def _info(name: str, shards: list[dict[str, Any]], features: list[Any]) -> dict[str, Any]:
    splits = []
    for split in _splits_of(shards):
        chosen = [sh for sh in shards if sh["split"] == split]
        splits.append(
            {
                "name": split,
                "num_bytes": sum(sh["num_bytes"] for sh in chosen),
                "num_examples": sum(sh["rows"] for sh in chosen),
            }
        )
    size = sum(sh["num_bytes"] for sh in shards)
    return {
        "config_name": name,
        "features": copy.deepcopy(features),  # no YAML anchors/aliases in the card
        "splits": splits,
        "download_size": size,
        "dataset_size": size,
    }


def render_merged_card(sources: dict[str, dict[str, Any]], out: Path) -> str:
    """The card of the merged dataset in `out`, whose shards are in place (deterministic:
    sources in name order). Its prevalence table, figures (drawn into `out/figures/`), text
    lengths and example rows are a built card's, over all sources."""
    header = _merged_header(sources)
    summary = summarise(out, header["mgll"]["label_names"])
    body = _merged_sources_table(sources, header["pretty_name"])
    body += _merged_labels(sources, summary) + summary_sections(out, summary)
    body += _merged_use_and_licences(sources)
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=100)
    return "---\n" + front + "---\n\n" + "\n".join(body)


def _merged_header(sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The YAML header: licence, one config per source and one of all, the merged `mgll` block."""
    names = sorted(sources)
    first = sources[names[0]]["mgll"]
    label_names = first["label_names"]
    annotated = set()
    for name in names:
        annotated.update(sources[name]["mgll"]["annotated_labels"])
    mgll = {key: first[key] for key in MUST_AGREE}
    mgll["schema_version"] = max(sources[n]["mgll"]["schema_version"] for n in names)
    mgll["annotated_labels"] = [n for n in label_names if n in annotated]
    mgll["sources"] = {
        n: {
            "annotated_labels": sources[n]["mgll"]["annotated_labels"],
            "license": sources[n]["license"],
        }
        for n in names
    }
    if OPTIONAL_COLUMNS_KEY in first:
        mgll[OPTIONAL_COLUMNS_KEY] = first[OPTIONAL_COLUMNS_KEY]
    features = schema_of_block(mgll).card_features()
    all_shards = [sh for n in names for sh in sources[n]["shards"]]

    licence_ids = sorted({str(sources[n]["license"].get("id", "other")) for n in names})
    header: dict[str, Any] = {"pretty_name": f"mgll {first['domain']} ({', '.join(names)})"}
    if len(licence_ids) == 1 and licence_ids[0].lower() in _HUB_LICENSES:
        header["license"] = licence_ids[0].lower()
    else:
        header.update(license="other", license_name="; ".join(licence_ids))
    header["task_categories"] = [
        "zero-shot-image-classification",
        "image-classification",
        "image-to-text",
    ]
    header["tags"] = ["medical", "mgll", "multi-label", "multi-granular", first["domain"]]
    header["configs"] = [{**_config("default", all_shards), "default": True}] + [
        _config(n, sources[n]["shards"]) for n in names
    ]
    header["dataset_info"] = [_info("default", all_shards, features)] + [
        _info(n, sources[n]["shards"], features) for n in names
    ]
    header["mgll"] = mgll
    return header


def _merged_sources_table(sources: dict[str, dict[str, Any]], pretty_name: str) -> list[str]:
    """The title, what a merge is, and each source's rows per split, texts and licence."""
    names = sorted(sources)
    first = sources[names[0]]["mgll"]
    label_names = first["label_names"]
    splits = _splits_of([sh for n in names for sh in sources[n]["shards"]])
    body = [
        f"# {pretty_name}",
        "",
        f"A merge of {len(names)} mgll datasets of the `{first['domain']}` domain (record schema "
        f"v{max(sources[n]['mgll']['schema_version'] for n in names)}, "
        f"vocabulary {first['vocab_version']}, "
        f"{len(label_names)} labels). Each source's shards are kept byte for byte under "
        "`data/{source}/`; the `default` config holds all of them and each source has its own "
        "config.",
        "",
        "## Sources",
        "",
        "| source (config) | " + " | ".join(splits) + " | texts | licence | redistribution |",
        "|---|" + "---|" * (len(splits) + 3),
    ]
    for n in names:
        src = sources[n]
        rows = [str(sum(sh["rows"] for sh in src["shards"] if sh["split"] == s)) for s in splits]
        kind = _TEXT_KINDS.get(src["text_kind"], src["text_kind"]).split(":")[0]
        lic = src["license"]
        body.append(
            f"| `{n}` | " + " | ".join(rows) + f" | {kind} | {lic.get('id')} | "
            f"{lic.get('redistribution')} |"
        )
    return body


def _merged_labels(sources: dict[str, dict[str, Any]], summary: Summary) -> list[str]:
    """Which labels each source leaves unannotated (NaN in all of its rows), and the
    positives / annotated rows per label and split over all sources."""
    names = sorted(sources)
    label_names = sources[names[0]]["mgll"]["label_names"]
    body = [
        "",
        "## Labels",
        "",
        "Labels follow `mgll.label_names`. A label a source does not annotate is NaN in all of "
        "its rows: `mgll.annotated_labels` is the union over sources, "
        "`mgll.sources.<source>.annotated_labels` each source's own (the same block travels in "
        "each shard's Parquet metadata under `mgll`).",
        "",
        "| source | labels not annotated |",
        "|---|---|",
    ]
    for n in names:
        missing = [x for x in label_names if x not in sources[n]["mgll"]["annotated_labels"]]
        body.append(f"| `{n}` | {', '.join(missing) or 'none'} |")
    counts = {s: summary.by_split[s] for s in SPLITS if s in summary.by_split}
    body += [
        "",
        "Positives / annotated rows per split, all sources together:",
        "",
        *prevalence_table(label_names, counts),
        "",
    ]
    return body


def _merged_use_and_licences(sources: dict[str, dict[str, Any]]) -> list[str]:
    """How to load it, each source's licence and citation, and the commands that rebuild it."""
    names = sorted(sources)
    body = [
        "## Use",
        "",
        "```python",
        "from datasets import load_dataset",
        'everything = load_dataset("path/or/repo-id")',
        f'one_source = load_dataset("path/or/repo-id", "{names[0]}")',
        "```",
        "",
        "## Licence and citation",
        "",
    ]
    for n in names:
        lic = sources[n]["license"]
        body += [
            f"`{n}`: {lic.get('id')} ({lic.get('url', '')}); redistribution: "
            f"{lic.get('redistribution')}. Cite:",
            "",
            "```",
            str(lic.get("citation", "")).strip(),
            "```",
            "",
        ]
    body += [
        "## Rebuild from the raw releases",
        "",
        "```",
        *[f"mgll-build-dataset build {n} --root RAW_{n.upper()} --out {n}" for n in names],
        f"mgll-build-dataset merge {' '.join(names)} --out MERGED",
        "```",
        "",
    ]
    return body
