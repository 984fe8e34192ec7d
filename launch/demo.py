"""`hibari demo`: the whole Swallow-style mission, shrunk to minutes on a CPU laptop, on data embedded in the repo.

The command: arguments, the work directory, the 7 steps in order. The steps are `launch/demo_steps.py`, the report
`launch/demo_report.py`, the generation check `launch/demo_generate.py`.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from hibari.errors import HibariError
from launch.demo_steps import DEFAULTS, LAYOUTS, MARKER, QUICK, Demo, process_cpu_seconds


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline end to end on embedded demo data (what `make demo` runs)",
        description="Clean + dedup Japanese web pages, expand a tokenizer, convert a model, continue pretraining it "
                    "with 4 processes (DP2xTP2, NVFP4), export it to Hugging Face and generate Japanese text -- "
                    "all with the real hibari commands, on data embedded in the repository (no downloads).")
    p.add_argument("--workdir", default="demo_work", help="work directory (default: ./demo_work); a directory "
                   "made by an earlier demo is replaced")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {DEFAULTS['steps']}, --quick {QUICK['steps']})")
    p.add_argument("--quick", action="store_true", help="reduced training run (the test suite uses it)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="dp2tp2", help="4-process parallel layout")
    p.add_argument("--nproc", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--no-preempt", action="store_true",
                   help="train in one go instead of stopping at mid-run (SIGUSR1) and resuming")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the corpus/data steps")
    p.set_defaults(func=_run_demo)


def prepare_workdir(workdir: Path) -> None:
    """An empty or missing directory, or one an earlier demo made (marker file): never wipe anything else."""
    if workdir.exists():
        if not workdir.is_dir():
            raise HibariError(f"--workdir {workdir}: exists and is not a directory")
        if any(workdir.iterdir()):
            if not (workdir / MARKER).is_file():
                raise HibariError(f"--workdir {workdir}: not empty and not made by `hibari demo` (no {MARKER} file); "
                                  f"choose another directory")
            shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `hibari demo`; the next demo run replaces this directory\n")



def _run_demo(args) -> int:
    quick = args.quick
    steps = args.steps if args.steps is not None else (QUICK["steps"] if quick else DEFAULTS["steps"])
    if steps < 2:
        raise HibariError(f"--steps {steps}: expected at least 2 (the run is preempted at mid-run and resumed)")
    if args.nproc != 4:
        raise HibariError(f"--nproc {args.nproc}: the demo layouts ({', '.join(LAYOUTS)}) need 4 processes")
    workdir = Path(args.workdir).resolve()
    prepare_workdir(workdir)
    demo = Demo(workdir, steps=steps, quick=quick, layout=args.layout, nproc=args.nproc,
                preempt=not args.no_preempt, workers=args.workers)
    t0, cpu0 = time.perf_counter(), process_cpu_seconds()
    print(f"hibari demo: work directory {workdir}" + (" (quick)" if quick else ""), flush=True)
    plan = [
        (1, "corpus", "clean + dedup the demo WARCs (two snapshots)", demo.step_corpus),
        (2, "base", "stand-in base model: English tokenizer + tiny Llama (HF format)", demo.step_base),
        (3, "tokenizer", "Japanese tokenizer, vocabulary expansion, expand-vocab", demo.step_tokenizer),
        (4, "data", "tokenize Japanese corpus + English replay", demo.step_data),
        (5, "train", f"hf-to-hibari + continual pretraining ({args.nproc} processes, {args.layout}, NVFP4)",
         demo.step_train),
        (6, "export", "hibari-to-hf, load with transformers, generate", demo.step_export),
        (7, "report", "report.md + charts", demo.step_report),
    ]
    try:
        for n, name, title, fn in plan:
            demo.run_step(n, name, title, fn)
    finally:
        demo.results["total_seconds"] = round(time.perf_counter() - t0, 1)
        demo.results["total_cpu_seconds"] = round(process_cpu_seconds() - cpu0, 1)
        demo.save_summary()
    print(f"\nhibari demo: all 7 steps done in {demo.results['total_seconds']:.0f}s; report: {workdir / 'report.md'}")
    return 0
