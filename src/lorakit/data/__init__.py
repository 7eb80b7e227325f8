"""Training data: JSONL / CSV / Parquet rows in three formats, tokenized with loss masks; the embedded demo.

    ds = load_dataset("data.jsonl", tokenizer, mode="sft", max_len=512)
    batch = collate(ds.examples[:8], pad_id=tokenizer.pad_token_id)

Formats (detected from a file's first row; see formats.py): "messages" (chat), "prompt"/"completion", "text".
"""

from .dataset import Dataset, collate, load_dataset, pad_id_of
from .demo import DEMO_DEFAULTS, demo_paths
from .formats import Example
from .rows import DataError, read_rows

__all__ = [
    "DEMO_DEFAULTS",
    "DataError",
    "Dataset",
    "Example",
    "collate",
    "demo_paths",
    "load_dataset",
    "pad_id_of",
    "read_rows",
]
