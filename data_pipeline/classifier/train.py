"""Train / evaluate the quality classifier from labelled documents, and the Wikipedia-vs-web recipe."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_pipeline.classifier.features import FeatureConfig, featurize
from data_pipeline.classifier.metrics import binary_metrics
from data_pipeline.classifier.model import QualityClassifier, TrainConfig, fit, sigmoid
from hibari.errors import HibariError
from hibari.io import ensure_writable_dir
from hibari.progress import progress_bar


def _records(inputs, text_key: str, columns: list[str], split: str | None, text_format: str):
    """(source, record number, record) of every input (`data_pipeline.readers`: JSONL, txt, parquet, arrow, saved
    datasets), plus a counter of records without a non-empty string text, which are skipped (counted)."""
    from data_pipeline.readers import iter_records, resolve_inputs

    skipped = {"no_text": 0}

    def walk():
        for src in resolve_inputs(inputs, split=split, text_format=text_format):
            for number, rec in enumerate(iter_records(src, text_key, columns), 1):
                if not isinstance(rec.get(text_key), str) or not rec[text_key]:
                    skipped["no_text"] += 1
                    continue
                yield src, number, rec
    return walk(), skipped


def read_labelled(inputs, label_key: str, positive: str | None, text_key: str = "text", split: str | None = None,
                  text_format: str = "line") -> tuple[list[str], np.ndarray, str, str, int]:
    """Texts and boolean labels. With `positive` given every other label value is negative; without it the data
    must have exactly two label values and the positive one is `good` (or the second in sorted order). Records
    without text are counted skips; a record without a label is an error. Returns (texts, labels, positive label,
    negative label name, records skipped for lack of text)."""
    texts: list[str] = []
    raw_labels: list[str] = []
    records, skipped = _records(inputs, text_key, [text_key, label_key], split, text_format)
    for src, number, rec in records:
        if label_key not in rec:
            raise HibariError(f"{src}: record {number} has no {label_key!r} field (--label-key: the field "
                              "holding each document's class)")
        if not isinstance(rec[label_key], (str, int, bool)):
            raise HibariError(f"{src}: record {number}: {label_key}={rec[label_key]!r}, expected a string or "
                              "integer class label")
        texts.append(rec[text_key])
        raw_labels.append(str(rec[label_key]))
    where = f"{inputs!r}"
    if not texts:
        raise HibariError(f"input {where}: no records with a {text_key!r} text ({skipped['no_text']} without); "
                          f"expected {text_key!r} and {label_key!r} per record")
    values = sorted(set(raw_labels))
    if positive is None:
        if len(values) != 2:
            raise HibariError(f"input {where}: {label_key!r} has {len(values)} value(s) {values[:5]}; expected two "
                              "classes (or name the positive one with --positive)")
        positive = "good" if "good" in values else values[1]
    if positive not in values:
        raise HibariError(f"input {where}: no record has {label_key}={positive!r} (values found: {values[:5]}); "
                          "expected both classes")
    others = [v for v in values if v != positive]
    if not others:
        raise HibariError(f"input {where}: every record has {label_key}={positive!r}; expected both classes")
    negative = others[0] if len(others) == 1 else "not-" + positive
    labels = np.array([lab == positive for lab in raw_labels], dtype=bool)
    return texts, labels, positive, negative, skipped["no_text"]


def holdout_split(texts: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random train / held-out indices; copies of one text always land on the same side (the labelled mC4 set has
    ~90 exact duplicates, which would otherwise inflate held-out accuracy)."""
    if not 0.0 < fraction < 1.0:
        raise HibariError(f"--holdout {fraction}: expected a fraction between 0 and 1")
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(t, len(group_of)) for t in texts])
    order = np.random.default_rng(seed).permutation(len(group_of))
    held_groups = np.zeros(len(group_of), dtype=bool)
    held_groups[order[:int(round(fraction * len(group_of)))]] = True
    held = held_groups[groups]
    return np.flatnonzero(~held), np.flatnonzero(held)


def train_classifier(texts: list[str], labels: np.ndarray, out_dir: str, positive: str, negative: str,
                     features: FeatureConfig | None = None, train: TrainConfig | None = None,
                     holdout: float = 0.2, seed: int = 0, show_progress: bool = True, source: dict | None = None
                     ) -> dict:
    """Fit on a random (1 - holdout) share, report metrics on the rest, save the model to `out_dir`.
    The saved model is the one the held-out numbers describe. Returns the report (also stored in model.json)."""
    features = features or FeatureConfig()
    train = train or TrainConfig()
    out = ensure_writable_dir(out_dir)
    train_idx, held_idx = holdout_split(texts, holdout, seed)
    for name, idx in (("training", train_idx), ("held-out", held_idx)):
        if len(set(labels[idx].tolist())) < 2:
            raise HibariError(f"{name} split ({len(idx)} documents) has one class only: need more labelled "
                              "documents of each class (or a different --holdout)")
    t0 = time.perf_counter()
    batch = featurize(texts, features)
    t_features = time.perf_counter() - t0
    with progress_bar(train.epochs, "train classifier", unit="epochs", enabled=show_progress) as bar:
        model = fit(batch.take(train_idx), labels[train_idx], features, train, positive, negative,
                    on_epoch=bar.advance)
    held = binary_metrics(sigmoid(model.logits(batch.take(held_idx))), labels[held_idx])
    train_metrics = binary_metrics(sigmoid(model.logits(batch.take(train_idx))), labels[train_idx])
    report = {"documents": len(texts), "training_documents": int(len(train_idx)),
              "heldout_documents": int(len(held_idx)), "holdout_fraction": holdout, "seed": seed,
              "train": asdict(train), "heldout": held, "training_fit": train_metrics,
              "seconds": {"features": round(t_features, 3), "total": round(time.perf_counter() - t0, 3)}}
    if source:
        report["source"] = source
    model.info = {"training": report}
    model.save(out)
    return report


def evaluate(model_dir: str, inputs, label_key: str, positive: str | None = None, text_key: str = "text",
             threshold: float = 0.5, split: str | None = None, text_format: str = "line") -> dict:
    model = QualityClassifier.load(model_dir)
    texts, labels, positive, _, skipped = read_labelled(inputs, label_key, positive or model.positive_label,
                                                        text_key, split, text_format)
    metrics = binary_metrics(model.score(texts), labels, threshold)
    return {"model": str(Path(model_dir)), "positive_label": positive, **metrics, "skipped_no_text": skipped}


def read_texts(inputs, text_key: str = "text", limit: int | None = None, seed: int = 0, split: str | None = None,
               text_format: str = "line") -> tuple[list[str], int]:
    """Every non-empty text of the inputs (records without one are counted); `limit` keeps a seeded sample."""
    records, skipped = _records(inputs, text_key, [text_key], split, text_format)
    texts = [rec[text_key] for _, _, rec in records]
    if not texts:
        raise HibariError(f"input {inputs!r}: no records with a {text_key!r} text ({skipped['no_text']} without)")
    if limit is not None and len(texts) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), limit, replace=False))
        texts = [texts[i] for i in keep]
    return texts, skipped["no_text"]


def train_from_sources(positive_inputs, negative_inputs, out_dir: str, text_key: str = "text",
                       max_per_class: int | None = None, split: str | None = None, text_format: str = "line",
                       **kwargs) -> dict:
    """Wikipedia-vs-web: positive = curated text (e.g. Wikipedia), negative = random cleaned web text. The classes
    are weighted equally in the loss whatever their sizes; `max_per_class` caps each (seeded sample)."""
    seed = kwargs.get("seed", 0)
    pos, pos_skipped = read_texts(positive_inputs, text_key, max_per_class, seed, split, text_format)
    neg, neg_skipped = read_texts(negative_inputs, text_key, max_per_class, seed, split, text_format)
    labels = np.concatenate([np.ones(len(pos), dtype=bool), np.zeros(len(neg), dtype=bool)])
    source = {"positive": [str(p) for p in positive_inputs] if isinstance(positive_inputs, list) else
              str(positive_inputs), "negative": [str(p) for p in negative_inputs]
              if isinstance(negative_inputs, list) else str(negative_inputs),
              "positive_documents": len(pos), "negative_documents": len(neg),
              "skipped_no_text": pos_skipped + neg_skipped}
    return train_classifier(pos + neg, labels, out_dir, "positive", "negative", source=source, **kwargs)
