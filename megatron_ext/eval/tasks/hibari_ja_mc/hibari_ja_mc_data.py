"""Dataset loader of the `hibari_ja_mc` task (referenced by `custom_dataset: !function` in its YAML).

lm-evaluation-harness resolves `dataset_kwargs.data_files` against the working directory, not the YAML's folder, so
a task that ships its data beside its YAML loads it here, by this file's own location: it runs offline from any
directory and from an installed wheel.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_FILE = Path(__file__).with_name("hibari_ja_mc.jsonl")


def load(**_metadata):
    """{"test": Dataset} of the 24 questions; `_metadata` is what lm-eval passes from the task's metadata."""
    import datasets

    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
