"""Run lm-evaluation-harness tasks on a model and record the results with a run.

    build_lm(model, tokenizer)        HibariLM around a live hibari model (see lm.py)
    run_tasks(lm, ["hibari_ja_mc"])   lm_eval.simple_evaluate with local task folders; returns a JSON-able dict
    metric_record(results)            {"eval/<task>/<metric>": value} for metrics.jsonl / trackers
    record_run_results(run_dir, step, results)   RUN/eval/step_XXXXXXXX.json + an "eval" event in metrics.jsonl

Task lookup is offline-first: the project's own tasks (tasks/ beside this file) and the folders given with
`task_dirs` are indexed; lm-eval's ~200 built-in task folders are indexed (which takes tens of seconds) only when
a requested name is not found locally, and those built-in tasks download their data unless it is cached.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from hibari.errors import HibariError

PACKAGED_TASKS = Path(__file__).resolve().parent / "tasks"
EVAL_DIR = "eval"
LM_EVAL_MISSING = "evaluation needs the lm-eval package: pip install 'hibari[eval]' (lm-eval[hf])"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise HibariError(LM_EVAL_MISSING) from None


def build_lm(model, tokenizer, max_length: int | None = None, batch_size: int = 8, progress: bool = True):
    """An lm_eval model around a live hibari model (`model(tokens) -> logits`, with `.args`)."""
    require_lm_eval()
    from megatron_ext.eval.lm import HibariLM

    return HibariLM.from_module(model, tokenizer, max_length=max_length, batch_size=batch_size, progress=progress)


CLI_NAMES = ("--tasks", "--task-dir")  # how errors name the task list and the task folders (config: eval.*)


def _check_task_dirs(task_dirs, names=CLI_NAMES) -> list[Path]:
    dirs = [PACKAGED_TASKS]
    for d in task_dirs or ():
        path = Path(d)
        if not path.is_dir():
            raise HibariError(f"{names[1]} {d}: not a directory (expected a folder of lm-eval task YAML files)")
        dirs.append(path.resolve())
    return dirs


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns on every task with a `custom_dataset` loader (ours) that --metadata exists: noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


_HINT_FILTER = _DropCustomDatasetHint()


def task_manager(tasks: list[str], task_dirs=(), names=CLI_NAMES):
    """A TaskManager that knows every name in `tasks` (local folders first, lm-eval's built-ins when needed)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.api.task").addFilter(_HINT_FILTER)  # a set: adding it again is a no-op

    dirs = _check_task_dirs(task_dirs, names)
    manager = TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)
    known = set(manager.all_tasks)
    if all(t in known for t in tasks):
        return manager
    local = sorted(known)
    manager = TaskManager(include_path=[str(d) for d in dirs], include_defaults=True)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise HibariError(f"{names[0]}: unknown task {unknown[0]!r} (local tasks: {', '.join(local)}; add a folder "
                          f"of task YAML files with {names[1]})")
    return manager


def _plain(value):
    """JSON-safe copy of lm-eval's result values (NaN stderr of a 1-sample task becomes null)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _plain(value.item())
    return str(value)


def run_tasks(lm, tasks: list[str], task_dirs=(), num_fewshot: int | None = None, limit: int | float | None = None,
              log_samples: bool = False, names=CLI_NAMES) -> dict:
    """Evaluate `lm` (an lm_eval LM) on `tasks`. Returns {"results": {task: {metric: value}}, "n-shot", "versions",
    "n-samples", "samples" (per-document records, with log_samples)}."""
    if not tasks:
        raise HibariError(f"{names[0]}: expected at least one task name")
    manager = task_manager(tasks, task_dirs, names)
    from lm_eval import simple_evaluate

    # lm-eval's default seeds (few-shot sampling): the same examples as `lm_eval --model hf` picks
    out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                          task_manager=manager, log_samples=log_samples, bootstrap_iters=0)
    if out is None:  # non-zero ranks of a distributed lm_eval model
        return {}
    keep = ("results", "groups", "n-shot", "versions", "n-samples")
    results = {k: _plain(out[k]) for k in keep if k in out}
    if log_samples:
        results["samples"] = {task: [{"doc_id": s["doc_id"], "target": _plain(s["target"]),
                                      "resps": _plain(s["filtered_resps"]), "acc": _plain(s.get("acc"))}
                                     for s in samples] for task, samples in out.get("samples", {}).items()}
    return results


def metric_record(results: dict) -> dict:
    """{"eval/<task>/<metric>": value}: lm-eval's "acc,none" keys without the default filter name; no stderr."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            flat[f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = value
    return flat


def eval_file(run_dir: str | Path, step: int) -> Path:
    from megatron_ext.checkpoint import step_dir_name

    return Path(run_dir) / EVAL_DIR / f"{step_dir_name(step)}.json"


def record_run_results(run_dir: str | Path, step: int, results: dict, source: str, writer=None) -> Path:
    """Write RUN/eval/step_XXXXXXXX.json and append {"event": "eval", "step", "eval/<task>/<metric>": ...} to the
    run's metrics.jsonl (through `writer`, the training run's MetricsWriter and its trackers, when given). Returns
    the JSON path."""
    from hibari.io import write_json
    from megatron_ext.train.metrics import MetricsWriter

    path = eval_file(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "source": source, "time": time.time(),
               **{k: v for k, v in results.items() if k != "samples"}}
    write_json(path, payload, indent=2)
    writer = writer if writer is not None else MetricsWriter(run_dir, enabled=True)
    writer.log_event({"event": "eval", "step": step, **metric_record(results), "time": payload["time"]})
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(path: str | Path, what: str):
    """An HF tokenizer from a local directory; `what` names the option in the one-line error."""
    from transformers import AutoTokenizer

    where = Path(path)
    if not where.is_dir() or not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise HibariError(f"{what}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {where}; expected a "
                          f"Hugging Face tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as err:
        raise HibariError(f"{what}: cannot load the tokenizer in {where} ({str(err).splitlines()[0]})") from None


def results_table(results: dict) -> str:
    """One line per task and metric: `task  metric  value`."""
    rows = [(k.split("/")[1], "/".join(k.split("/")[2:]), v) for k, v in metric_record(results).items()]
    if not rows:
        return "(no metrics)"
    width = max(len(t) for t, _, _ in rows)
    return "\n".join(f"{t:<{width}}  {m:<10} {v:.4f}" for t, m, v in rows)
