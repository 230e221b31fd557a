"""Data loading for mgll-train (mgll_train.data) on real Parquet built with mgll_data."""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_data.record import read_mgll_metadata, text_hash
from mgll_train.data import (
    MgllDataset,
    ParquetRecords,
    SampleTransform,
    StreamingRecords,
    TruncationStats,
    collate,
    make_dataset,
    parse_sources,
    resolve_data,
)
from mgll_train.data.images import image_config_from_model, pad_resize
from mgll_train.data.labels import aligned_label_names, apply_label_policy
from mgll_train.data.normalize import normalize_images
from mgll_train.data.tokenizer import TextTokenizer, split_sentences

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CONTEXT = 16


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A 40-row demo ChestX-ray14 build with 64-px images: (out dir, rows per split)."""
    root = tmp_path_factory.mktemp("train-data")
    raw = write_demo_release(root / "raw", n=40, seed=0, image_size=96)
    summary = build(
        load_pipeline("chestxray14"), raw, root / "out", BuildOptions(progress=False, image_size=64)
    )
    return root / "out", dict(summary.rows)


@pytest.fixture(scope="session")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16", context_length=CONTEXT)


def rewrite(src: Path, dst: Path, label_names=None, annotated=None, labels=None, rows_per_group=10):
    """Copy a shard with other `mgll` label names/annotated labels/label rows and row groups."""
    table = pq.read_table(src)
    meta = dict(table.schema.metadata)
    block = json.loads(meta[b"mgll"])
    if label_names is not None:
        block["label_names"] = label_names
    if annotated is not None:
        block["annotated_labels"] = annotated
    if labels is not None:
        k = len(labels[0])
        column = pa.array(labels, type=pa.list_(pa.float32(), k))
        table = table.set_column(table.schema.get_field_index("labels"), "labels", column)
    meta[b"mgll"] = json.dumps(block).encode()
    meta.pop(b"huggingface", None)
    pq.write_table(table.replace_schema_metadata(meta), dst, row_group_size=rows_per_group)
    return dst


def train_shard(built) -> Path:
    return next((built[0] / "data").glob("train-*.parquet"))


def transform(tokenizer, **kwargs) -> SampleTransform:
    return SampleTransform(TextTokenizer(tokenizer), 32, MEAN, STD, **kwargs)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------ sources


def test_resolve_data_directory_file_glob_and_errors(built, tmp_path):
    out, _ = built
    files = sorted((out / "data").glob("*.parquet"))
    assert resolve_data(str(out)) == files
    assert resolve_data(str(files[0])) == [files[0]]
    assert resolve_data(str(out / "data" / "train-*.parquet")) == [train_shard(built)]
    with pytest.raises(ValueError, match="nowhere.parquet: no such file or directory"):
        resolve_data(str(tmp_path / "nowhere.parquet"))
    with pytest.raises(ValueError, match="no Parquet files"):
        resolve_data(str(tmp_path))
    with pytest.raises(ValueError, match="matches no .parquet"):
        resolve_data(str(tmp_path / "*.parquet"))


def test_parse_sources_factors(built):
    out, _ = built
    sources = parse_sources(f"{out}::{train_shard(built)}", "1::2.5")
    assert [w for _, w in sources] == [1.0, 2.5]
    assert sources[1][0] == [train_shard(built)]
    assert [w for _, w in parse_sources(str(out), None)] == [1.0]
    with pytest.raises(ValueError, match="2 upsampling factors for 1 data sources"):
        parse_sources(str(out), "1::2")


def test_hf_missing_cache_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError) as err:
        resolve_data("hf:some-org/some-dataset")
    message = str(err.value)
    assert "hf:some-org/some-dataset: not in the local Hugging Face cache" in message
    assert "\n" not in message


def test_hf_cached_snapshot_resolves_to_its_parquet(built, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "datasets--org--demo"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    target = data / "train-00000-of-00001.parquet"
    target.write_bytes(train_shard(built).read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert [p.name for p in resolve_data("hf:org/demo")] == [target.name]


# ------------------------------------------------------------------------------ records


def test_split_filtering_matches_the_build(built):
    out, rows = built
    files = resolve_data(str(out))
    for split in ("train", "test"):
        records = ParquetRecords(files, split=split, columns=["id", "split"])
        assert len(records) == rows[split] > 0
        assert {records[i]["split"] for i in range(len(records))} == {split}
    assert len(ParquetRecords(files, split="validation")) == rows["validation"] == 0
    assert len(ParquetRecords(files, split=None)) == sum(rows.values())


def test_row_equals_pyarrow_across_row_groups(built, tmp_path):
    shard = rewrite(train_shard(built), tmp_path / "rg.parquet", rows_per_group=7)
    assert pq.ParquetFile(shard).metadata.num_row_groups > 2
    expected = pq.read_table(shard).to_pylist()
    records = ParquetRecords([shard], split="train")
    assert len(records) == len(expected)
    for i in [0, 6, 7, 13, 20, len(records) - 1, 3]:
        row = records[i]
        assert row.pop("_file") == 0
        got, want = json.dumps(row, default=repr), json.dumps(expected[i], default=repr)
        assert got == want, i
    assert records.index[7].tolist() == [0, 1, 0]


# ------------------------------------------------------------------------------- images


@pytest.mark.parametrize("size", [(40, 20), (20, 40)])
def test_non_square_image_is_padded_not_cropped(size):
    image = Image.new("L", size, 255)
    padded = np.asarray(pad_resize(image, 32))
    assert padded.shape == (32, 32)
    ys, xs = np.nonzero(padded > 128)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert (width, height) == ((32, 16) if size[0] > size[1] else (16, 32))  # aspect kept
    band = padded[:8] if size[0] > size[1] else padded[:, :8]
    assert (band == 0).all() and (padded[8:24, 8:24] == 255).all()  # pad 0, content whole


def test_transform_image_pad_value_and_grey_to_rgb(tokenizer):
    t = transform(tokenizer)
    grey = Image.fromarray(np.tile(np.arange(0, 240, 6, dtype=np.uint8), (20, 1)))  # 40×20
    pixels = t.image(png(grey), np.random.default_rng(0))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    tensor = normalize_images(pixels[None], MEAN, STD, "cpu")[0]
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])
    assert torch.allclose(tensor[:, :8], torch.tensor((0 - 0.5) / 0.25))  # padded rows
    rgb = Image.merge("RGB", [Image.new("L", (32, 32), v) for v in (0, 128, 255)])
    channels = normalize_images(
        t.image(png(rgb), np.random.default_rng(0))[None], MEAN, STD, "cpu"
    )[0]
    assert channels[:, 16, 16].tolist() == pytest.approx(
        [-2.0, (128 / 255 - 0.5) / 0.25, 2.0], abs=1e-5
    )


def test_augmentation_is_mild_and_deterministic_per_sample(built, tokenizer):
    plain = make_dataset(str(built[0]), transform(tokenizer))
    augmented = make_dataset(str(built[0]), transform(tokenizer, augment=True))
    a, b = augmented[3]["image"], augmented[3]["image"]
    assert torch.equal(a, b)
    assert not torch.equal(a, plain[3]["image"])
    levels = (a.float() - plain[3]["image"].float()).abs().mean()
    assert levels < 0.25 * 255  # a small crop, not another image (1.0 normalised before)
    augmented.set_epoch(1)
    assert not torch.equal(augmented[3]["image"], a)


def test_image_config_from_open_clip_model():
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=1, width=32, patch_size=8, image_size=32, head_width=16
        ),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=16, vocab_size=49408, width=32, heads=2, layers=1
        ),
    )
    size, mean, std = image_config_from_model(model)
    assert size == 32
    assert mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    tok = open_clip.get_tokenizer("ViT-B-16", context_length=model.context_length)
    t = SampleTransform.from_model(model, tok)
    assert (t.image_size, t.tokenizer.context_length) == (32, 16)


# ------------------------------------------------------------------------------- labels


def test_label_policy_cases():
    stored = np.array([-1.0, np.nan, np.nan, 1.0, 0.0, -1.0], dtype=np.float32)
    annotated = np.array([True, True, False, True, True, False])

    def same(a, b):
        return np.array_equal(a, np.array(b, dtype=np.float32), equal_nan=True)

    nan = math.nan
    assert same(apply_label_policy(stored, annotated), [nan, 0, nan, 1, 0, nan])
    assert same(apply_label_policy(stored, annotated, "positive"), [1, 0, nan, 1, 0, 1])
    assert same(apply_label_policy(stored, annotated, "negative"), [0, 0, nan, 1, 0, 0])
    assert same(
        apply_label_policy(stored, annotated, unmentioned="ignore"), [nan] * 3 + [1, 0, nan]
    )
    with pytest.raises(ValueError):
        apply_label_policy(stored, annotated, uncertain="maybe")


def test_label_policy_in_the_dataset_uses_annotated_labels(built, tokenizer, tmp_path):
    src = train_shard(built)
    block = read_mgll_metadata(src)
    names, annotated = block["label_names"], set(block["annotated_labels"])
    never = names.index("Enlarged Cardiomediastinum")
    assert names[never] not in annotated
    stored = pq.read_table(src, columns=["labels"])["labels"].to_pylist()
    stored[0][0] = -1.0  # No Finding uncertain
    stored[0][2] = math.nan  # Cardiomegaly (annotated) unmentioned
    shard = rewrite(src, tmp_path / "policy.parquet", labels=stored)
    records = ParquetRecords([shard], split="train")

    def labels(**policy):
        return MgllDataset(records, transform(tokenizer, **policy))[0]["labels"]

    default = labels()
    assert math.isnan(default[0]) and default[2] == 0 and math.isnan(default[never])
    assert labels(uncertain="positive")[0] == 1
    ignored = labels(unmentioned="ignore")
    assert math.isnan(ignored[2]) and math.isnan(ignored[never])
    assert not torch.isnan(default[[i for i, n in enumerate(names) if n in annotated]][1:]).any()


def test_alignment_of_datasets_with_different_label_lists(built, tokenizer, tmp_path):
    src = train_shard(built)
    block = read_mgll_metadata(src)
    names = block["label_names"]
    other = ["Pleural Effusion", "Brand New Finding", "Cardiomegaly", "No Finding"]
    stored = pq.read_table(src, columns=["labels"])["labels"].to_pylist()
    moved = [
        [row[names.index(n)] if n in names else (1.0 if i % 2 else 0.0) for n in other]
        for i, row in enumerate(stored)
    ]
    second = rewrite(src, tmp_path / "other.parquet", other, other, moved)
    union, maps = aligned_label_names([src, second])
    assert union == [*names, "Brand New Finding"]
    assert maps[second].tolist()[names.index("Cardiomegaly")] == 2
    assert maps[src][-1] == -1

    records = ParquetRecords([src, second], split="train")
    dataset = MgllDataset(records, transform(tokenizer))
    first, again = dataset[0]["labels"], dataset[len(stored)]["labels"]
    assert records.label_names == union and first.shape == again.shape == (len(union),)
    assert math.isnan(first[-1]) and again[-1] == 0.0  # never annotated in the first dataset
    for name in ("Pleural Effusion", "Cardiomegaly", "No Finding"):
        j = union.index(name)
        assert again[j] == first[j] == stored[0][names.index(name)]
    assert math.isnan(again[union.index("Mass")])  # the second dataset lacks Mass: NaN


def test_upsampling_factors_set_relative_frequency(built, tmp_path):
    src = train_shard(built)
    other = rewrite(src, tmp_path / "b.parquet")
    n = pq.read_metadata(src).num_rows
    records = ParquetRecords.from_sources([([src], 1.0), ([other], 3.0)], split="train")
    from_b = int((records.index[:, 0] == 1).sum())
    assert len(records) == 4 * n and from_b == 3 * n
    _, per_row = np.unique(records.index[records.index[:, 0] == 1, 1:], axis=0, return_counts=True)
    assert len(per_row) == n and (per_row == 3).all()  # every row of b exactly three times

    half = ParquetRecords.from_sources([([src], 0.5), ([other], 1.5)], split="train", seed=1)
    counts = np.bincount(half.index[:, 0], minlength=2)
    assert counts.tolist() == [round(0.5 * n), n + round(0.5 * n)]
    again = ParquetRecords.from_sources([([src], 0.5), ([other], 1.5)], split="train", seed=1)
    assert np.array_equal(half.index, again.index)  # deterministic for a seed


# -------------------------------------------------------------------------------- texts


LONG = "Heart size is normal. The lungs are clear. No pleural effusion. No pneumothorax is seen."


def test_truncation_is_flagged_and_counted(tokenizer):
    text_tok = TextTokenizer(tokenizer)
    assert text_tok.count(LONG) > CONTEXT
    tokens, truncated = text_tok.tokenize(LONG)
    assert truncated and tokens.shape == (CONTEXT,)
    assert tokens[-1] == tokenizer.eot_token_id
    assert torch.equal(tokens, tokenizer([LONG])[0])  # open_clip's own cutting
    short, cut = text_tok.tokenize("Normal chest.")
    assert not cut and torch.equal(short, tokenizer(["Normal chest."])[0])

    stats = TruncationStats(["category", "description"])
    stats.update({"truncated": torch.tensor([[False, False], [True, False]])})
    stats.update({"truncated": torch.tensor([[False, False], [True, True]])})
    assert stats.rates() == {"category": 0.0, "description": 0.75}


def test_cached_tokens_equal_open_clips_and_the_cache_stays_bounded(tokenizer):
    """Repeated texts come from the cache; every result still equals open_clip's tokenizer, and
    the cache keeps the most recently used texts up to its size (and none in a copied worker)."""
    texts = [LONG, "Normal chest.", "Cardiomegaly.", LONG, "Normal chest.", "No finding.", LONG]
    text_tok = TextTokenizer(tokenizer, cache_size=2)
    for text in texts:
        tokens, truncated = text_tok.tokenize(text)
        assert torch.equal(tokens, tokenizer([text])[0]), text
        assert truncated == (text == LONG)
    assert list(text_tok._cache) == ["No finding.", LONG]  # the two most recent, oldest first
    full = (tokenizer.sot_token_id, *tokenizer.encode(LONG), tokenizer.eot_token_id)
    assert text_tok._cache[LONG] == full
    assert pickle.loads(pickle.dumps(text_tok))._cache == {}
    uncached = TextTokenizer(tokenizer, cache_size=0)
    assert uncached.count(LONG) == text_tok.count(LONG) and not uncached._cache


def test_sentence_sampling_keeps_order_and_fits(tokenizer):
    text_tok = TextTokenizer(tokenizer)
    sentences = split_sentences(LONG)
    assert len(sentences) == 4
    seen = set()
    for seed in range(12):
        sampled = text_tok.sample_sentences(LONG, np.random.default_rng(seed))
        parts = split_sentences(sampled)
        assert parts and set(parts) <= set(sentences)
        positions = [sentences.index(p) for p in parts]
        assert positions == sorted(positions)
        assert text_tok.count(sampled) <= CONTEXT and not text_tok.tokenize(sampled)[1]
        seen.add(sampled)
    assert len(seen) > 1  # random subsets, not always the same cut
    assert text_tok.sample_sentences("Normal chest.", np.random.default_rng(0)) == "Normal chest."


def test_text_ids_are_hashes_of_the_final_texts(built, tokenizer):
    plain = make_dataset(str(built[0]), transform(tokenizer))
    sampled = make_dataset(str(built[0]), transform(tokenizer, text_sampling="sentences"))
    columns = ["text_category", "text_description", "text_explanation"]
    sentence_tok = sampled.transform.tokenizer
    any_sampled = False
    for i in range(len(plain)):
        record = plain.records[i]
        assert plain[i]["text_ids"].tolist() == [text_hash(record[c]) for c in columns]
        rng = np.random.default_rng([0, 0, i])
        finals = [sentence_tok.sample_sentences(record[c], rng) for c in columns]
        sample = sampled[i]
        assert sample["text_ids"].tolist() == [text_hash(t) for t in finals]
        any_sampled |= finals != [record[c] for c in columns]
        if any(sentence_tok.count(record[c]) > CONTEXT for c in columns):
            assert plain[i]["truncated"].any()
    assert any_sampled
    flags = torch.stack([plain[i]["truncated"] for i in range(len(plain))])
    flags_sampled = torch.stack([sampled[i]["truncated"] for i in range(len(sampled))])
    assert flags_sampled.sum() < flags.sum()


# --------------------------------------------------------------------------- DataLoader


def test_dataloader_with_two_workers_yields_batches(built, tokenizer):
    out, rows = built
    dataset = make_dataset(str(out), transform(tokenizer))
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate)
    batches = list(loader)
    first = batches[0]
    assert first["images"].shape == (8, 3, 32, 32) and first["images"].dtype == torch.uint8
    assert first["texts"].shape == (3, 8, CONTEXT) and first["texts"].dtype == torch.long
    assert first["labels"].shape == (8, len(dataset.label_names))
    assert first["labels"].dtype == torch.float32
    assert first["text_ids"].shape == (3, 8) and first["text_ids"].dtype == torch.int64
    assert first["truncated"].shape == (3, 8)
    ids = [i for b in batches for i in b["ids"]]
    assert len(ids) == rows["train"] == len(set(ids))
    assert ids == [dataset.records[i]["id"] for i in range(len(dataset))]
    assert torch.equal(first["images"][1], dataset[1]["image"])


# ---------------------------------------------------------------------------- streaming


def test_streaming_splits_row_groups_over_ranks_and_workers(built, tokenizer, tmp_path):
    shard = rewrite(train_shard(built), tmp_path / "s.parquet", rows_per_group=5)
    test_shard = next((built[0] / "data").glob("test-*.parquet"))
    expected = set(pq.read_table(shard, columns=["id"])["id"].to_pylist())
    stream = StreamingRecords([([shard, test_shard], 1.0)], transform(tokenizer), split="train")
    units = len(stream.units)
    covered = []
    for rank in range(2):
        for worker in range(2):
            covered.extend(stream.positions_for(rank, 2, worker, 2))
    assert sorted(covered) == list(range(units))  # each row group read by exactly one worker

    stream.set_epoch(0)
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=collate)
    batches = list(loader)
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == sorted(expected)  # every train row once, test rows dropped
    assert batches[0]["texts"].shape[:2] == (3, 4)
    assert ids == [
        i for b in DataLoader(stream, 4, num_workers=2, collate_fn=collate) for i in b["ids"]
    ]

    stream.set_epoch(0, start_unit=3)
    order = stream.order()
    resumed = {s["id"] for s in stream}
    first_three = set()
    table = pq.read_table(shard, columns=["id"])["id"].to_pylist()
    for position in range(3):
        file, group = stream.units[order[position]]
        if file == 0:
            first_three |= set(table[group * 5 : group * 5 + 5])
    assert resumed == expected - first_three  # resumed at the row group after the first three
