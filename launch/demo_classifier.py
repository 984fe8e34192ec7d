"""Demo, end of step 1: the quality classifier (Swallow Corpus v2 step) trained on the demo corpus itself.

No download: the positive class is what `corpus clean` kept, the negative class the pages its quality and NG-word
rules dropped (their text comes from the drop ledger, `--keep-dropped-text`). The demo then scores the deduplicated
corpus with `corpus annotate --classifier`, the way a real run would apply a Wikipedia-vs-web model.
"""

from __future__ import annotations

import json
from pathlib import Path

from hibari.io import read_jsonl, write_jsonl

NEGATIVE_STAGES = ("quality", "ngword")


def classifier_demo(demo, clean: Path, dedup: Path) -> dict:
    """`demo` runs hibari commands (`demo.hibari(*words)`) and owns the work dir `demo.w`."""
    out = demo.w / "corpus" / "classifier"
    out.mkdir(parents=True, exist_ok=True)
    negatives = [{"text": r["text"], "stage": r["stage"], "reason": r["reason"]}
                 for ledger in sorted((clean / "_ledger").glob("*.jsonl.zst")) for r in read_jsonl(ledger)
                 if r.get("stage") in NEGATIVE_STAGES and r.get("text")]
    write_jsonl(out / "negative.jsonl", negatives)
    demo.hibari("corpus", "classifier", "train-from-sources", "--positive", str(clean / "*.jsonl.zst"),
                "--negative", out / "negative.jsonl", "--out", out / "model", "--holdout", "0.25", "--quiet")
    demo.hibari("corpus", "annotate", "--input", str(dedup / "*.jsonl.zst"), "--output", out / "annotated.jsonl.zst",
                "--classifier", out / "model", "--no-ngword", "--quiet")
    training = json.loads((out / "model" / "model.json").read_text(encoding="utf-8"))["training"]
    scores = [r["quality_score"] for r in read_jsonl(out / "annotated.jsonl.zst") if "quality_score" in r]
    held = training["heldout"]
    return {"positive_docs": training["source"]["positive_documents"], "negative_docs": len(negatives),
            "heldout_docs": training["heldout_documents"], "heldout_accuracy": round(held["accuracy"], 4),
            "heldout_f1": round(held["f1"], 4), "heldout_roc_auc": round(held["roc_auc"], 4),
            "scored_docs": len(scores), "mean_score": round(sum(scores) / max(len(scores), 1), 4),
            "below_threshold": sum(s < 0.5 for s in scores)}


def summary_line(c: dict) -> str:
    return (f"quality classifier ({c['positive_docs']} kept vs {c['negative_docs']} rule-dropped pages): held-out "
            f"accuracy {c['heldout_accuracy']:.2f}, ROC AUC {c['heldout_roc_auc']:.2f} on {c['heldout_docs']} docs; "
            f"{c['scored_docs']} deduplicated docs scored, mean {c['mean_score']:.2f}, "
            f"{c['below_threshold']} below 0.5")
