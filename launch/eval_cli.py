"""`hibari eval`: downstream evaluation of a hibari checkpoint or an HF model with lm-evaluation-harness.

    hibari eval --ckpt RUN/checkpoints/step_00001000 --tokenizer TOK --tasks hibari_ja_mc
    hibari eval --ckpt RUN --tasks hibari_ja_mc,jcommonsenseqa --task-dir ~/jglue-tasks
    hibari eval --hf EXPORT --tasks hibari_ja_mc --out results.json

--ckpt takes any hibari checkpoint (converted, or a training step of any parallel layout: the shards are merged on
load), a run's checkpoints/ folder or the run directory (its newest complete step). It is scored by the hibari
model itself through `megatron_ext.eval.HibariLM`. --hf scores a Hugging Face model directory through lm-eval's
own HF backend. Given a run's step, the results go to RUN/eval/step_XXXXXXXX.json and into RUN/metrics.jsonl.
This command lives in launch/ because it joins checkpoints/ (loading) and megatron_ext/ (the harness).
"""

from __future__ import annotations

from pathlib import Path

from hibari.errors import HibariError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="downstream evaluation with lm-evaluation-harness (pip install "
                                           "'hibari[eval]')")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="hibari checkpoint, a run's checkpoints/ folder or a run directory (newest step)")
    src.add_argument("--hf", help="Hugging Face model directory (scored by lm-eval's HF backend)")
    p.add_argument("--tasks", required=True, help="comma-separated task names (e.g. hibari_ja_mc)")
    p.add_argument("--task-dir", action="append", default=[], metavar="DIR",
                   help="folder of lm-eval task YAML files (+ their data), repeatable; searched before lm-eval's "
                        "built-in tasks")
    p.add_argument("--tokenizer", help="HF tokenizer directory (default: the model/checkpoint directory)")
    p.add_argument("--out", help="also write the results JSON here")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document responses in --out")
    p.set_defaults(func=_eval)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None, int | None]:
    """(checkpoint dir, run dir or None, step or None) for a checkpoint, a checkpoints/ folder or a run dir."""
    from megatron_ext.checkpoint import MODEL_JSON, TRAIN_STATE, find_latest, read_train_state

    path = Path(path)
    if not path.is_dir():
        raise HibariError(f"--ckpt {path}: not a directory")
    if not (path / MODEL_JSON).is_file():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = find_latest(root)
        if latest is None:
            raise HibariError(f"--ckpt {path}: no hibari checkpoint here ({MODEL_JSON} not found, and no complete "
                              f"step directory under {root})")
        path = latest
    if (path / TRAIN_STATE).is_file() and path.parent.name == "checkpoints":
        return path, path.parent.parent, read_train_state(path)["step"]
    return path, None, None


def _tokenizer(model_dir: Path, explicit: str | None):
    from megatron_ext.eval.harness import load_tokenizer

    if explicit:
        return load_tokenizer(explicit, f"--tokenizer {explicit}")
    return load_tokenizer(model_dir, f"--tokenizer (not given, so the model directory {model_dir})")


def _hibari_lm(args, ckpt: Path):
    import torch

    from checkpoints import load_hibari
    from megatron_ext.eval.harness import build_lm

    tokenizer = _tokenizer(ckpt, args.tokenizer)
    model = load_hibari(ckpt, dtype=getattr(torch, DTYPES[args.dtype]))
    try:
        model = model.to(args.device)
    except (RuntimeError, AssertionError) as err:
        raise HibariError(f"--device {args.device}: {str(err).splitlines()[0]}") from None
    return build_lm(model, tokenizer, batch_size=args.batch_size)


def _hf_lm(args):
    from megatron_ext.eval.harness import require_lm_eval

    require_lm_eval()
    hf = Path(args.hf)
    if not (hf / "config.json").is_file():
        raise HibariError(f"--hf {hf}: not a Hugging Face model directory (config.json not found)")
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise HibariError(f"--hf needs lm-eval's HF backend ({err.name} is missing): pip install 'hibari[eval]'") \
            from None
    tokenizer = _tokenizer(hf, args.tokenizer)
    return HFLM(pretrained=str(hf), tokenizer=tokenizer, batch_size=args.batch_size, device=args.device,
                dtype=DTYPES[args.dtype])


def _eval(args) -> int:
    from hibari.io import write_json
    from megatron_ext.eval.harness import record_run_results, require_lm_eval, results_table, run_tasks

    require_lm_eval()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.batch_size < 1:
        raise HibariError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.limit is not None and args.limit < 1:
        raise HibariError(f"--limit {args.limit}: expected a positive integer")
    run_dir = step = None
    if args.ckpt is not None:
        ckpt, run_dir, step = resolve_checkpoint(args.ckpt)
        lm, source = _hibari_lm(args, ckpt), {"ckpt": str(ckpt)}
    else:
        lm, source = _hf_lm(args), {"hf": str(Path(args.hf))}
    results = run_tasks(lm, tasks, task_dirs=args.task_dir, num_fewshot=args.num_fewshot, limit=args.limit,
                        log_samples=args.log_samples)
    print(results_table(results))
    if args.out:
        try:
            write_json(args.out, {**source, "tasks": tasks, **results}, indent=2)
        except OSError as err:
            raise HibariError(f"--out {args.out}: cannot write ({err.strerror or err})") from None
        print(f"hibari: results written to {args.out}")
    if run_dir is not None:
        path = record_run_results(run_dir, step, results, source=source["ckpt"])
        print(f"hibari: results written to {path} and {run_dir / 'metrics.jsonl'}")
    return 0
