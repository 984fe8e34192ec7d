"""Benchmark of the quality classifier (not run by `make test`).

  python bench/classifier.py [--rounds 7] [--batch 256] [--sweep] [--out bench/results/classifier.md]

Speed: documents/s per core (CPU seconds of this process) of batched classifier scoring (featurize + score,
`QualityClassifier.score`) beside the Swallow quality rules' batched features (`quality_features_batch`, with and
without the NG-word matcher), on the same real documents in the same run, interleaved round by round (the order
alternates), median of the rounds. Documents: the 1,676 labelled mC4 texts (short, mean 221 characters) and the
100 FineWeb-2 Japanese documents (mean 654 characters) from ../shared/data.

Accuracy (--sweep): held-out accuracy / ROC AUC on the labelled mC4 set over 5 seeded 80/20 splits (copies of one
text on one side) for the default settings and variations of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import datetime
import platform
import time

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
LABELLED = SHARED / "mc4-ja-quality-labeled" / "mc4_ja_labeled_normalized.jsonl"
FINEWEB = SHARED / "ja-web-text" / "fineweb2-edu-japanese-100" / "fineweb_100_samples.jsonl"

SWEEP = [  # (label, FeatureConfig kwargs, TrainConfig kwargs)
    ("default: 1-3-grams, 2^18 buckets, width folding, log-count L2 rows, l2 1e-4, 150 epochs, balanced", {}, {}),
    ("1-2-grams", {"max_n": 2}, {}),
    ("1-4-grams", {"max_n": 4}, {}),
    ("2-3-grams (no unigrams)", {"min_n": 2}, {}),
    ("2^16 buckets", {"bucket_bits": 16}, {}),
    ("2^20 buckets", {"bucket_bits": 20}, {}),
    ("no width folding", {"fold_width": False}, {}),
    ("+ ASCII lower-casing", {"lowercase": True}, {}),
    ("l2 3e-5", {}, {"l2": 3e-5}),
    ("l2 3e-4", {}, {"l2": 3e-4}),
    ("80 epochs", {}, {"epochs": 80}),
    ("300 epochs", {}, {"epochs": 300}),
    ("classes not balanced", {}, {"balance_classes": False}),
]


DEVELOPMENT_NOTES = """
What else was tried while developing (same 5 grouped splits unless said; not rerun by this script):

- fastText (`fasttext-numpy2` 0.10.4, the maintained numpy-2 binding; texts split into space-separated characters,
  since Japanese has no spaces): wordNgrams 3, 25 epochs, lr 0.5, thread 1: **0.748 +- 0.019**; wordNgrams 2:
  0.732; defaults (5 epochs): 0.59. The linear model here is ~2 points better, deterministic, needs no extra
  package, and its model files are plain JSON + `.npy`.
- fastText-style mean features (value = count / number of n-grams) with the same logistic regression: ~0.73.
- Binary (presence) instead of log counts: 0.755. IDF weighting of the log counts: 0.751 (square-root IDF:
  0.765). NB-SVM-style log-count-ratio scaling: 0.760. Multinomial naive Bayes: 0.73.
- Extra feature groups: the 27 Swallow quality features as dense inputs (log-scaled, standardised): 0.755;
  character-class n-grams (hiragana/katakana/kanji/latin/digit/punctuation, 1-5): 0.758; n-grams of the first 30-60
  characters in their own buckets: 0.744-0.766; script-run tokens (runs of one script as pseudo-words) + their
  bigrams: 0.755-0.766; separately normalised 1/2/3-gram groups: 0.769-0.773.
- A plain random 80/20 split that ignores the ~90 duplicated texts scores higher (0.779 +- 0.009, AUC 0.873) because
  copies of a training text land in the held-out part; the numbers above keep copies on one side.

None reached the 0.80 held-out target: the labels are one annotator's good/bad judgements of short mC4 snippets
(2 texts carry both labels), and every linear character-n-gram variant tried lands at 0.76-0.78.
"""


def cpu_per_doc(fn, texts, batch: int) -> float:
    t0 = time.process_time()
    for i in range(0, len(texts), batch):
        fn(texts[i:i + batch])
    return (time.process_time() - t0) / len(texts)


def speed(model, sets: dict, rounds: int, batch: int) -> list[tuple]:
    from data_pipeline.filters import NGWordMatcher, quality_features_batch

    matcher = NGWordMatcher.default()
    methods = {"classifier (featurize + score)": model.score,
               "Swallow quality features (batched)": quality_features_batch,
               "Swallow quality + NG-word features (batched)": lambda ts: quality_features_batch(ts, matcher)}
    rows = []
    for set_name, texts in sets.items():
        for fn in methods.values():  # warm-up (lookup tables, caches)
            fn(texts[:batch])
        times = {m: [] for m in methods}
        for r in range(rounds):
            order = list(methods) if r % 2 == 0 else list(methods)[::-1]
            for m in order:
                times[m].append(cpu_per_doc(methods[m], texts, batch))
        rule = float(np.median(times["Swallow quality features (batched)"]))
        for m in methods:
            med = float(np.median(times[m]))
            rows.append((set_name, m, 1.0 / med, med * 1e6, med / rule))
    return rows


def sweep(texts, labels) -> list[tuple]:
    from data_pipeline.classifier.features import FeatureConfig, featurize
    from data_pipeline.classifier.metrics import binary_metrics
    from data_pipeline.classifier.model import TrainConfig, fit
    from data_pipeline.classifier.train import holdout_split

    rows = []
    for label, fk, tk in SWEEP:
        cfg = FeatureConfig(**fk)
        batch = featurize(texts, cfg)
        acc, auc, f1 = [], [], []
        for seed in range(5):
            tr, te = holdout_split(texts, 0.2, seed)
            model = fit(batch.take(tr), labels[tr], cfg, TrainConfig(**tk))
            m = binary_metrics(1 / (1 + np.exp(-model.logits(batch.take(te)))), labels[te])
            acc.append(m["accuracy"])
            auc.append(m["roc_auc"])
            f1.append(m["f1"])
        rows.append((label, np.mean(acc), np.std(acc), np.mean(f1), np.mean(auc)))
        print(f"{label}: accuracy {np.mean(acc):.4f} +- {np.std(acc):.4f}  AUC {np.mean(auc):.4f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sweep", action="store_true", help="also run the accuracy sweep (~2 min)")
    ap.add_argument("--out", default=None, help="write the markdown section here")
    args = ap.parse_args()
    from data_pipeline.classifier.train import read_labelled, train_classifier
    from hibari.io import read_jsonl

    if not LABELLED.is_file():
        sys.exit(f"missing {LABELLED}")
    texts, labels, pos, neg, _ = read_labelled(str(LABELLED), "label", None)
    import tempfile
    from data_pipeline.classifier.model import QualityClassifier
    with tempfile.TemporaryDirectory() as tmp:
        report = train_classifier(texts, labels, tmp, pos, neg, seed=0, show_progress=False)
        model = QualityClassifier.load(tmp)
    sets = {"mC4 labelled (1,676 docs, 221 chars avg)": texts}
    if FINEWEB.is_file():
        web = [r["text"] for r in read_jsonl(FINEWEB)]
        sets[f"FineWeb-2 ja ({len(web)} docs x 4, {np.mean([len(t) for t in web]):.0f} chars avg)"] = web * 4
    rows = speed(model, sets, args.rounds, args.batch)
    for r in rows:
        print(f"{r[0]} | {r[1]}: {r[2]:,.0f} docs/s per core, {r[3]:.0f} us/doc, x{r[4]:.2f} of the rules")
    sweep_rows = sweep(texts, labels) if args.sweep else []
    if args.out:
        write_markdown(Path(args.out), report, rows, sweep_rows, args)


def write_markdown(path: Path, report, rows, sweep_rows, args) -> None:
    h = report["heldout"]
    lines = ["## Corpus quality classifier (bench/classifier.py)", "",
             f"Machine: {platform.machine()} CPU ({platform.processor() or 'unknown'}), 2 cores shared with ~8 other "
             f"jobs (loaded: CPU time of this process is quoted, not wall time), date {datetime.date.today()}, "
             f"command `python bench/classifier.py --rounds {args.rounds}{' --sweep' if args.sweep else ''}`.", "",
             "### Scoring speed beside the Swallow rules (same documents, same run, interleaved; median of rounds)",
             "", "| documents | method | docs/s per core | us/doc (CPU) | cost / rules |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:,.0f} | {r[3]:.0f} | {r[4]:.2f} |" for r in rows]
    lines += ["", f"Batches of {args.batch} documents. The classifier includes width folding, hashing of every "
              "1-3-gram, the per-document log-count / L2 step and the dot product; the goal is cost / rules <= 1.", "",
              "### Held-out quality (labelled mC4, 1,676 texts; seed 0 80/20 split, copies kept on one side)", "",
              f"accuracy {h['accuracy']:.4f}, F1 {h['f1']:.4f}, ROC AUC {h['roc_auc']:.4f} "
              f"({report['heldout_documents']} held-out documents, {report['seconds']['total']:.1f} s to featurize + "
              "train).", ""]
    if sweep_rows:
        lines += ["Variations (5 seeded splits each; mean +- std):", "",
                  "| settings | accuracy | F1 | ROC AUC |", "|---|---:|---:|---:|"]
        lines += [f"| {r[0]} | {r[1]:.4f} +- {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} |" for r in sweep_rows]
    lines += ["", DEVELOPMENT_NOTES.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
