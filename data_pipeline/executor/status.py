"""`hibari corpus status DIR`: per stage of a state directory, what is done, failed and pending.

Every runner records each stage it runs (`STATE_DIR/stages/<stage>.json`, SLURM also
`STATE_DIR/slurm/<stage>/manifest.json` with its array jobs). A task is done when its marker parses; a corrupt
marker counts as pending (and the task is redone by the next run).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from hibari.errors import HibariError
from hibari.io import write_json

from data_pipeline.executor.tasks import DONE_DIR, FAILED_DIR, read_marker

STAGES_DIR = "stages"
SLURM_DIR = "slurm"


def stage_name(desc: str, task_ids: list[str]) -> str:
    """Name of one runner call: its description plus a hash of its task ids (stable across reruns)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", desc).strip("-") or "tasks"
    digest = hashlib.sha1("\n".join(task_ids).encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


def record_stage(state_dir: str | Path, desc: str, task_ids: list[str], runner: str) -> str:
    name = stage_name(desc, task_ids)
    path = Path(state_dir) / STAGES_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"desc": desc, "task_ids": task_ids, "runner": runner})
    return name


def _manifests(state: Path) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for path in sorted((state / STAGES_DIR).glob("*.json")):
        m = read_marker(path)
        if m and isinstance(m.get("task_ids"), list):
            found[path.stem] = m
    for path in sorted((state / SLURM_DIR).glob("*/manifest.json")):
        m = read_marker(path)
        if m and isinstance(m.get("task_ids"), list):
            try:
                jobs = json.loads((path.parent / "jobs.json").read_text())
            except (OSError, ValueError):
                jobs = []
            found[path.parent.name] = {**found.get(path.parent.name, {}), **m, "jobs": jobs, "runner": "slurm"}
    return found


def find_state_dir(path: str | Path) -> Path:
    """The state directory itself, or the one inside an output: OUT/.state (clean), OUT/_dedup/state (dedup),
    PREFIX.parts (tokenize)."""
    path = Path(path)
    if not path.is_dir() and not Path(f"{path}.parts").is_dir():
        raise HibariError(f"{path}: no such state directory")
    for cand in (path, path / ".state", path / "_dedup" / "state", Path(f"{path}.parts")):
        if cand.is_dir() and any((cand / d).is_dir() for d in (DONE_DIR, STAGES_DIR, SLURM_DIR)):
            return cand
    raise HibariError(f"{path}: not a state directory (expected done/ or stages/ in it, or an output with .state/, "
                      "_dedup/state/ or PREFIX.parts/)")


def status_summary(state_dir: str | Path) -> dict:
    """Per stage: task counts done / failed / pending (corrupt markers count as pending), queued array jobs."""
    from data_pipeline.executor.slurm import array_active

    state = find_state_dir(state_dir)
    done_ids, corrupt = set(), []
    for p in (state / DONE_DIR).glob("*.json"):
        (done_ids.add(p.stem) if read_marker(p) is not None else corrupt.append(p.stem))
    failed_ids = {p.stem for p in (state / FAILED_DIR).glob("*.json")} - done_ids
    stages = []
    known: set[str] = set()
    for name, m in _manifests(state).items():
        ids = [str(t) for t in m["task_ids"]]
        known.update(ids)
        running = {}
        if m.get("jobs") and shutil.which("squeue"):
            for j in m["jobs"]:
                n = array_active(j)
                if n:
                    running[j] = n
        d = sum(1 for t in ids if t in done_ids)
        f = sum(1 for t in ids if t in failed_ids)
        stages.append({"stage": name, "desc": m.get("desc", ""), "runner": m.get("runner", "?"), "total": len(ids),
                       "done": d, "failed": f, "pending": len(ids) - d - f, "active_jobs": running,
                       "failed_tasks": [t for t in ids if t in failed_ids],
                       "corrupt_markers": [t for t in ids if t in corrupt]})
    return {"stages": stages, "done_without_manifest": len(done_ids - known),
            "failed_without_manifest": sorted(failed_ids - known), "corrupt_markers": sorted(corrupt)}


def format_status(summary: dict, state_dir: str | Path) -> str:
    lines = []
    for s in summary["stages"]:
        active = ", ".join(f"array job {j}: {n} elements queued/running" for j, n in s["active_jobs"].items())
        lines.append(f"{s['desc'] or s['stage']}: {s['total']} tasks: {s['done']} done, {s['failed']} failed, "
                     f"{s['pending']} pending" + (f" ({active})" if active else ""))
        for tid in s["failed_tasks"][:10]:
            info = read_marker(Path(state_dir) / FAILED_DIR / f"{tid}.json") or {}
            lines.append(f"  failed {tid}: {info.get('error', '?')} (host {info.get('host', '?')}, "
                         f"log {info.get('log', '?')})")
        if len(s["failed_tasks"]) > 10:
            lines.append(f"  ... and {len(s['failed_tasks']) - 10} more failed")
    if summary["done_without_manifest"] or not summary["stages"]:
        lines.append(f"{summary['done_without_manifest']} tasks done outside the recorded stages")
    for tid in summary["failed_without_manifest"]:
        lines.append(f"  failed {tid}")
    for tid in summary["corrupt_markers"]:
        lines.append(f"  corrupt done-marker {tid}: counted as pending, the next run redoes the task")
    return "\n".join(lines)


def register_corpus_commands(sub) -> None:
    """`hibari corpus status DIR` (registered into the corpus group by data_pipeline.corpus.cli)."""
    p = sub.add_parser("status", help="summarise done / failed / pending shards of a corpus state directory",
                       description="Counts completion markers in a state directory (the executor's STATE_DIR: "
                                   "done/<task>.json, failed/<task>.json) per stage, and the SLURM array jobs of "
                                   "those stages still in the queue. A corrupt marker counts as pending.")
    p.add_argument("state_dir", metavar="DIR",
                   help="a state directory (OUT/.state), or the output of corpus clean / dedup, or a tokenize PREFIX")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _status(args) -> int:
    summary = status_summary(args.state_dir)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_status(summary, find_state_dir(args.state_dir)))
    return 0
