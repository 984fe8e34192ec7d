"""`hibari corpus annotate`: Swallow quality + NG-word features and the keep decision for plain-text JSONL."""

from __future__ import annotations

from pathlib import Path

from hibari.io import read_jsonl, write_jsonl
from hibari.errors import HibariError
from hibari.progress import progress_bar

RULE_CHOICES = ("quality", "ngword")
_BATCH_RECORDS = 256  # records per batched feature computation (numpy per-call overheads amortised)


def parse_rules(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    rules = tuple(r.strip() for r in value.split(",") if r.strip())
    bad = [r for r in rules if r not in RULE_CHOICES]
    if bad or not rules:
        raise HibariError(f"--rules {value!r}: expected a comma-separated subset of {','.join(RULE_CHOICES)}")
    return rules


def annotate_file(input_path: str, output_path: str, rules: tuple[str, ...] | None = None,
                  ng_paths: list[str] | None = None, use_ng: bool = True, show_progress: bool = True) -> dict:
    """Write every record of `input_path` with `features`, `keep`, `reasons` added. Records without a string
    `text` are copied with `keep: false, reasons: ["no_text_field"]` (counted, never dropped)."""
    from data_pipeline.filters import NGWordMatcher, quality_decision, quality_features_batch

    src = Path(input_path)
    if not src.is_file():
        raise HibariError(f"--input {src}: no such file (expected JSONL or JSONL.zst with a 'text' field)")
    dst = Path(output_path)
    if not dst.parent.exists():
        raise HibariError(f"--output {dst}: directory {dst.parent} does not exist")
    if rules is not None and "ngword" in rules and not use_ng:
        raise HibariError("--rules ngword needs an NG word list (drop --no-ngword)")
    matcher = None
    if use_ng:
        for p in ng_paths or []:
            if not Path(p).exists():
                raise HibariError(f"--ng-words {p}: no such file or directory")
        matcher = NGWordMatcher.from_files(ng_paths) if ng_paths else NGWordMatcher.default()
    counts = {"records": 0, "kept": 0, "dropped": 0, "no_text_field": 0}
    reasons: dict[str, int] = {}

    def finish(batch):
        """Annotate a batch of records in input order (features computed in one batched call)."""
        texts = [rec["text"] for rec in batch if isinstance(rec.get("text"), str)]
        feats = iter(quality_features_batch(texts, matcher))
        for rec in batch:
            if not isinstance(rec.get("text"), str):
                counts["no_text_field"] += 1
                rec.update(keep=False, reasons=["no_text_field"])
                continue
            f = next(feats)
            keep, why = quality_decision(f, rules)
            counts["kept" if keep else "dropped"] += 1
            for r in why:
                reasons[r] = reasons.get(r, 0) + 1
            rec["features"] = f
            rec["keep"] = keep
            rec["reasons"] = why
        return batch

    def annotated(bar):
        batch = []
        for rec in read_jsonl(src):
            counts["records"] += 1
            bar.advance()
            batch.append(rec)
            if len(batch) == _BATCH_RECORDS:
                yield from finish(batch)
                batch = []
        yield from finish(batch)

    with progress_bar(None, f"annotate {src.name}", unit="docs", enabled=show_progress) as bar:
        write_jsonl(dst, annotated(bar))
    counts["reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    return counts
