"""Downstream evaluation through lm-evaluation-harness (the optional `lm-eval` package: `pip install hibari[eval]`).

    lm.py       HibariLM: an lm_eval model around a live hibari model (scores like `lm_eval --model hf`)
    harness.py  task lookup (local YAML + JSONL task folders first, offline), simple_evaluate, results files
    tasks/      the project's own tasks: hibari_ja_mc (24 Japanese multiple-choice questions)

`hibari eval` (launch/eval_cli.py) loads checkpoints and calls these; the trainer can call them on its live model.
Nothing here imports lm_eval until a function needs it, so importing the package is cheap.
"""
