"""Data loading for `mgll-train`: Parquet records of mgll builds → training batches.

Pipeline::

    sources = parse_sources("out_a::out_b/data/*.parquet", "1::2")   # [(files, factor), ...]
    records = ParquetRecords.from_sources(sources, split="train")    # map-style, by row group
    transform = SampleTransform.from_model(model, tokenizer)
    dataset = MgllDataset(records, transform)                        # or make_dataset(spec, ...)
    loader = DataLoader(dataset, batch_size=..., num_workers=..., collate_fn=collate)

Where things live:

* `sources.py`    — data specs (directories, files, globs, `hf:org/name`, `A::B`) → Parquet files
* `labels.py`     — each file's `mgll` block, label names aligned across files, the label policy
* `records.py`    — `ParquetRecords`: rows by row group, split index, upsampling factors
* `images.py`     — decode, pad to square, augment, resize (uint8 out)
* `normalize.py`  — `model_input`: uint8 batches → the model's normalised input, on its device
* `tokenizer.py`  — `TextTokenizer`: token counts, truncation flags, sentence sampling
* `transforms.py` — `SampleTransform`: a record → image, tokens, labels, text ids, flags
* `dataset.py`    — `MgllDataset`, `make_dataset`, `collate`, `TruncationStats`
* `streaming.py`  — `StreamingRecords` for `--streaming`

The record contract (column names, granularities, the `mgll` block, `text_hash`) is
`mgll_data.record`; nothing here re-declares it.
"""

from .dataset import MgllDataset, TruncationStats, collate, make_dataset
from .records import ParquetRecords, split_row_count
from .sources import parse_sources, resolve_data
from .streaming import StreamingRecords
from .transforms import SampleTransform

__all__ = [
    "MgllDataset",
    "ParquetRecords",
    "SampleTransform",
    "StreamingRecords",
    "TruncationStats",
    "collate",
    "make_dataset",
    "parse_sources",
    "resolve_data",
    "split_row_count",
]
