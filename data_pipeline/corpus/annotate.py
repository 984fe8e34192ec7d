"""`hibari corpus annotate`: Swallow quality + NG-word features and the keep decision for plain-text JSONL.

The output records what it was made from (`OUTPUT.run.json`: input paths with size and mtime, the resolved
`AnnotateConfig`, reader options, digests of the classifier model and NG word lists, then the counts). The same
command again is a no-op; other inputs, config or models into an existing output are refused naming the change,
unless `overwrite=True` (`data_pipeline.executor.provenance`, the mechanism of every stage).
"""

from __future__ import annotations

from pathlib import Path

from data_pipeline.corpus.config import AnnotateConfig
from data_pipeline.executor.provenance import (check_output, resource_digests, source_identity,
                                               write_provenance)
from data_pipeline.executor.tasks import read_marker
from data_pipeline.readers import iter_records, resolve_inputs
from hibari.io import write_jsonl
from hibari.errors import HibariError
from hibari.progress import progress_bar

RULE_CHOICES = ("quality", "ngword")
RECORD_SUFFIX = ".run.json"  # OUTPUT + this: the provenance record and counts of the run that wrote OUTPUT
_BATCH_RECORDS = 256  # records per batched feature computation (numpy per-call overheads amortised)


def parse_rules(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    rules = tuple(r.strip() for r in value.split(",") if r.strip())
    bad = [r for r in rules if r not in RULE_CHOICES]
    if bad or not rules:
        raise HibariError(f"--rules {value!r}: expected a comma-separated subset of {','.join(RULE_CHOICES)}")
    return rules


def record_path(output_path: str | Path) -> Path:
    dst = Path(output_path).absolute()
    return dst.with_name(dst.name + RECORD_SUFFIX)


def annotate_file(input_path, output_path: str, cfg: AnnotateConfig | None = None, *, show_progress: bool = True,
                  text_key: str = "text", split: str | None = None, text_format: str = "line",
                  overwrite: bool = False) -> dict:
    """Write every record of `input_path` (paths/globs/dirs of any `data_pipeline.readers` format, in order) with
    `features`, `keep`, `reasons` added. Records without a string `text_key` are copied with `keep: false,
    reasons: ["no_text_field"]` (counted, never dropped). `cfg.quality.enabled` / `cfg.ngword.enabled`: whether the
    quality rules / the NG-word rule (`ng_fraction >= ngword.max_fraction`) decide `keep` (NG-word features are only
    computed when enabled); `cfg.classifier.model` adds `quality_score` to every record with text and drops (keep:
    false) those below `classifier.threshold`. Returns the counts (`already_done: true` when nothing had to be
    done)."""
    from data_pipeline.filters import NGWordMatcher, quality_decision, quality_features_batch

    cfg = cfg or AnnotateConfig()
    sources = resolve_inputs(input_path, split=split, text_format=text_format)
    dst = Path(output_path).absolute()
    if not dst.parent.exists():
        raise HibariError(f"--output {dst}: directory {dst.parent} does not exist")
    if any(Path(src.path) == dst for src in sources):
        raise HibariError(f"--output {dst}: is also an input; write the annotated records elsewhere")
    matcher = None
    if cfg.ngword.enabled:
        for p in cfg.ngword.paths or []:
            if not Path(p).exists():
                raise HibariError(f"ngword.paths: {p}: no such file or directory")
        matcher = NGWordMatcher.from_files(cfg.ngword.paths) if cfg.ngword.paths else NGWordMatcher.default()
    scorer = None
    if cfg.classifier.model:
        from data_pipeline.classifier.step import ClassifierFilter
        scorer = ClassifierFilter(cfg.classifier)  # model checked before any output is written
    resources = {}
    if scorer is not None:
        resources["classifier_model"] = resource_digests([cfg.classifier.model])
    if matcher is not None and cfg.ngword.paths:
        resources["ngword_lists"] = resource_digests(cfg.ngword.paths)
    record = {"inputs": [source_identity(src) for src in sources], "config": cfg.model_dump(mode="json"),
              "options": {"text_key": text_key, "text_format": text_format, "split": split},
              "resources": resources}
    run_record = record_path(dst)
    old = check_output(run_record, record, f"--output {dst}", overwrite, has_results=dst.exists(),
                       ignore=("stats",))
    if old is None and dst.exists():
        done = (read_marker(run_record) or {}).get("stats")
        if isinstance(done, dict):
            return {**done, "already_done": True}
    dst.unlink(missing_ok=True)  # an earlier run's output never stays next to this run's record
    write_provenance(run_record, record)  # before the output: a killed run leaves a record without stats
    groups = ("quality",) if cfg.quality.enabled else ()
    ng_reason = f"ng_fraction>={cfg.ngword.max_fraction:g}"
    counts = {"records": 0, "kept": 0, "dropped": 0, "no_text_field": 0}
    reasons: dict[str, int] = {}

    def finish(batch):
        """Annotate a batch of records in input order (features computed in one batched call)."""
        texts = [rec[text_key] for rec in batch if isinstance(rec.get(text_key), str)]
        feats = iter(quality_features_batch(texts, matcher))
        scores = iter(scorer.model.score(texts).tolist() if scorer else [])  # one batched call
        for rec in batch:
            if not isinstance(rec.get(text_key), str):
                counts["no_text_field"] += 1
                rec.update(keep=False, reasons=["no_text_field"])
                continue
            f = next(feats)
            keep, why = quality_decision(f, groups)
            if matcher is not None and f["ng_fraction"] >= cfg.ngword.max_fraction:
                keep, why = False, why + [ng_reason]
            if scorer is not None:
                rec["quality_score"] = score = round(next(scores), 5)
                if score < scorer.threshold:
                    keep, why = False, why + [scorer.reason]
            counts["kept" if keep else "dropped"] += 1
            for r in why:
                reasons[r] = reasons.get(r, 0) + 1
            rec["features"] = f
            rec["keep"] = keep
            rec["reasons"] = why
        return batch

    def annotated(bar):
        batch = []
        for rec in (r for src in sources for r in iter_records(src, text_key)):
            counts["records"] += 1
            bar.advance()
            batch.append(rec)
            if len(batch) == _BATCH_RECORDS:
                yield from finish(batch)
                batch = []
        yield from finish(batch)

    desc = f"annotate {Path(sources[0].path).name}{' ...' if len(sources) > 1 else ''}"
    with progress_bar(None, desc, unit="docs", enabled=show_progress) as bar:
        write_jsonl(dst, annotated(bar))
    counts["reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    write_provenance(run_record, {**record, "stats": counts})
    return counts
