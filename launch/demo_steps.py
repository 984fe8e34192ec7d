"""The steps of `hibari demo` (the command itself is `launch/demo.py`): the whole Swallow-style mission, shrunk to minutes on a CPU laptop, on data embedded in the repo.

Every step runs the REAL command (`hibari corpus clean`, `hibari tokenizer expand`, `hibari launch local`, ...):
the demo only chooses the arguments, prints the equivalent command line, and reads the artifacts the commands
write to build its report. Two things have no hibari command because a real team downloads them: the stand-in
"base" model (a tiny random Llama from `launch/demo_data/base_model_config.json`, saved with `transformers`) and the
final generation check (`transformers` loading the exported directory, as a user would).

Steps (WORKDIR/<dir> in brackets):
  1 corpus     clean + dedup the demo WARCs of two snapshots                    [corpus/clean, corpus/dedup]
               + a quality classifier trained on them, scoring the corpus        [corpus/classifier]
  2 base       base tokenizer on English text, tiny Llama in HF format         [base/tokenizer, base/hf]
  3 tokenizer  Japanese tokenizer, expansion into the base one, expand-vocab   [tokenizer/*, model/expanded_hf]
  4 data       tokenize Japanese corpus + English replay (90/10 blend)         [data/ja, data/en]
  5 train      hf-to-hibari, 4-process DP2xTP2 NVFP4 training, preemption at mid-run, resume  [model/init, run]
  6 export     hibari-to-hf, load with transformers, generate Japanese         [export/hf]
  7 report     report.md + PNGs                                                [report.md, *.png]
"""


from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hibari.errors import HibariError
from megatron_ext.train.metrics import read_metrics
from launch.demo_classifier import classifier_demo, summary_line as classifier_summary
from launch.demo_generate import generate
from launch.demo_report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
MARKER = ".hibari-demo"
SUMMARY_FILE = "demo_summary.json"
PROMPTS = ["旅行の計画を立てるときは、", "今日は朝から雨が降っていて、", "プログラムを書き始める前に、"]

# sizes of the demo; `--quick` (the test) trims the training run
DEFAULTS = {"base_vocab": 1000, "ja_vocab": 2000, "steps": 60, "gen_tokens": 40}
QUICK = {"steps": 12, "gen_tokens": 16}
QUICK_TRAIN_OVERRIDES = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_interval=6", "checkpoint.interval=6"]
LAYOUTS = {  # 4 processes
    "dp2tp2": ["parallel.dp_shard=-1", "parallel.tp=2", "parallel.pp=1"],
    "pp2tp2": ["parallel.dp_shard=1", "parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=1f1b",
               "parallel.pp_microbatches=2"],
}



# ----------------------------------------------------------------------------------------------------------------
# command plumbing
def _command_parser_map():
    """{("corpus", "clean"): parser, ...} for every sub-command the installed `hibari` has."""
    from launch.cli import build_parser

    found: dict[tuple[str, ...], object] = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[prefix + (name,)] = sub
                    walk(sub, prefix + (name,))

    walk(build_parser(), ())
    return found


def hibari_argv(words: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *words]


def _shown(words: list[str]) -> str:
    return "$ hibari " + " ".join(shlex.quote(w) for w in words)


@dataclass
class Step:
    n: int
    name: str
    title: str
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process + finished children: comparable across loaded/unloaded machines
    status: str = "pending"
    summary: str = ""
    commands: list[str] = field(default_factory=list)



class Demo:
    def __init__(self, workdir: Path, steps: int, quick: bool, layout: str, nproc: int, preempt: bool,
                 workers: int):
        self.w = workdir
        self.steps = steps
        self.quick = quick
        self.layout = layout
        self.nproc = nproc
        self.preempt = preempt
        self.workers = workers
        self.gen_tokens = QUICK["gen_tokens"] if quick else DEFAULTS["gen_tokens"]
        self.commands = _command_parser_map()
        self.results: dict = {"workdir": str(workdir), "quick": quick, "layout": layout, "nproc": nproc,
                              "train_steps": steps}
        self.step_log: list[Step] = []
        self.current: Step | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), self.env.get("PYTHONPATH")) if p)

    # -- helpers -------------------------------------------------------------------------------------------------
    def require(self, *words: str) -> None:
        if tuple(words) not in self.commands:
            s = self.current
            raise HibariError(f"step {s.n} ({s.name}) unavailable: `hibari {' '.join(words)}` is not installed yet")

    def hibari(self, *words: str) -> None:
        """Run one real `hibari` command in a child process (its progress bars go straight to the terminal)."""
        words = [str(w) for w in words]
        shown = _shown(words)
        self.current.commands.append(shown[2:])  # "hibari ..."
        print(shown, flush=True)
        rc = subprocess.call(hibari_argv(words), env=self.env)
        if rc != 0:
            s = self.current
            raise HibariError(f"step {s.n} ({s.name}) failed: `hibari {' '.join(words[:2])}` exited with status "
                              f"{rc} (its output is above)")

    def save_summary(self) -> None:
        self.results["steps"] = [s.__dict__ for s in self.step_log]
        (self.w / SUMMARY_FILE).write_text(json.dumps(self.results, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")

    def run_step(self, n: int, name: str, title: str, fn) -> None:
        step = Step(n, name, title)
        self.step_log.append(step)
        self.current = step
        print(f"\n=== [{n}/7] {name}: {title}", flush=True)
        t0, cpu0 = time.perf_counter(), process_cpu_seconds()
        step.status = "running"
        try:
            step.summary = fn() or ""
            step.status = "ok"
        except BaseException:
            step.status = "failed"
            raise
        finally:
            step.seconds = round(time.perf_counter() - t0, 1)
            step.cpu_seconds = round(process_cpu_seconds() - cpu0, 1)
            self.save_summary()
        print(f"--- step {n} {name} done in {step.seconds:.1f}s: {step.summary}", flush=True)

    # -- step 1 ---------------------------------------------------------------------------------------------------
    def step_corpus(self) -> str:
        for words in (("corpus", "clean"), ("corpus", "dedup"), ("corpus", "classifier")):
            self.require(*words)
        warcs = sorted(DEMO_DATA.glob("warc/*/*.warc.gz"))
        if not warcs:
            raise HibariError(f"{DEMO_DATA}/warc: no demo WARC files (run launch/demo_data/make_demo_data.py)")
        clean, dedup = self.w / "corpus" / "clean", self.w / "corpus" / "dedup"
        self.hibari("corpus", "clean", "--input", str(DEMO_DATA / "warc" / "*" / "*.warc.gz"), "--output", clean,
                    "--workers", self.workers, "--keep-dropped-text")  # dropped texts: the classifier's negatives
        self.hibari("corpus", "dedup", "--input", clean, "--output", dedup, "--workers", self.workers)
        c = json.loads((clean / "report.json").read_text(encoding="utf-8"))
        d = json.loads((dedup / "_dedup" / "report.json").read_text(encoding="utf-8"))
        pages_in = c["stages"][0]["pages_in"]
        self.results["corpus"] = {
            "warc_files": len(warcs), "pages_in": pages_in, "clean_kept": c["documents_written"],
            "clean_stages": [{k: s[k] for k in ("name", "pages_in", "pages_out")} for s in c["stages"]],
            "drop_reasons": c.get("drop_reasons", {}), "dedup_removed": d["dup_removed"],
            "host_removed": d["host_removed"], "hosts_dropped": d["hosts_dropped"], "final_docs": d["docs_out"],
            "cluster_size_histogram": d.get("cluster_size_histogram", {}), "clusters": d.get("clusters"),
            "docs_out_per_snapshot": d.get("docs_out_per_snapshot", {})}
        r = self.results["corpus"]
        r["classifier"] = classifier_demo(self, clean, dedup)
        print(classifier_summary(r["classifier"]))
        funnel = " -> ".join(f"{s['name']} {s['pages_out']}" for s in r["clean_stages"])
        print(f"funnel: {pages_in} pages: {funnel} -> dedup {r['clean_kept'] - r['dedup_removed']} "
              f"-> host filter {r['final_docs']}")
        return (f"{pages_in} pages in {len(warcs)} WARC files -> {r['clean_kept']} kept by clean -> "
                f"{r['final_docs']} after dedup ({r['dedup_removed']} near-duplicates in {r['clusters']} clusters, "
                f"{r['host_removed']} page(s) of {r['hosts_dropped']} dropped host(s))")

    # -- step 2 ---------------------------------------------------------------------------------------------------
    def step_base(self) -> str:
        self.require("tokenizer", "train")
        tok, hf = self.w / "base" / "tokenizer", self.w / "base" / "hf"
        self.hibari("tokenizer", "train", "--input", DEMO_DATA / "english.jsonl.zst", "--vocab-size",
                    DEFAULTS["base_vocab"], "--out", tok, "--model-type", "bpe")
        # stand-in for downloading a base model: a tiny random Llama from a Hugging Face config
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from hibari.progress import progress_bar

        config = LlamaConfig.from_json_file(str(DEMO_DATA / "base_model_config.json"))
        config.vocab_size = _sp_vocab_size(tok)
        with progress_bar(total=2, desc="base model", unit="part") as bar:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            bar.advance(1)
            model.save_pretrained(str(hf))
            for f in tok.iterdir():  # the model directory carries its tokenizer, like a hub download
                if f.is_file():
                    shutil.copy2(f, hf / f.name)
            bar.advance(1)
        n_params = sum(p.numel() for p in model.parameters())
        self.results["base"] = {"vocab_size": config.vocab_size, "params": n_params,
                                "layers": config.num_hidden_layers, "hidden_size": config.hidden_size}
        return (f"base tokenizer {config.vocab_size} pieces (English BPE, byte fallback); tiny Llama "
                f"{n_params / 1e6:.2f}M parameters ({config.num_hidden_layers} layers, dim {config.hidden_size}) "
                f"saved in HF format")

    # -- step 3 ---------------------------------------------------------------------------------------------------
    def step_tokenizer(self) -> str:
        for words in (("tokenizer", "train"), ("tokenizer", "expand"), ("convert", "expand-vocab")):
            self.require(*words)
        dedup = self.w / "corpus" / "dedup"
        ja, expanded = self.w / "tokenizer" / "ja", self.w / "tokenizer" / "expanded"
        shards = sorted(str(p) for p in dedup.glob("*.jsonl.zst"))
        self.hibari("tokenizer", "train", "--input", *shards, "--vocab-size", DEFAULTS["ja_vocab"], "--out", ja,
                    "--model-type", "bpe", "--normalization", "nfkc")
        self.hibari("tokenizer", "expand", "--base", self.w / "base" / "tokenizer", "--add", ja, "--out", expanded,
                    "--sample", *shards)
        self.hibari("convert", "expand-vocab", "--hf", self.w / "base" / "hf", "--tokenizer", expanded, "--out",
                    self.w / "model" / "expanded_hf")
        info = json.loads((expanded / "hibari_tokenizer.json").read_text(encoding="utf-8"))
        hf_cfg = json.loads((self.w / "model" / "expanded_hf" / "config.json").read_text(encoding="utf-8"))
        self.results["tokenizer"] = {
            "base_vocab": info.get("base_vocab_size"), "ja_vocab": DEFAULTS["ja_vocab"],
            "added_pieces": info.get("added_pieces"), "expanded_vocab": info.get("vocab_size"),
            "model_vocab": hf_cfg["vocab_size"], "chars_per_token_before": info.get("chars_per_token_before"),
            "chars_per_token_after": info.get("chars_per_token_after")}
        t = self.results["tokenizer"]
        return (f"vocabulary {t['base_vocab']} -> {t['expanded_vocab']} (+{t['added_pieces']} Japanese pieces; model "
                f"embeddings {t['model_vocab']} rows); characters per token on the corpus "
                f"{t['chars_per_token_before']:.2f} -> {t['chars_per_token_after']:.2f}")

    # -- step 4 ---------------------------------------------------------------------------------------------------
    def step_data(self) -> str:
        self.require("data", "tokenize")
        expanded = self.w / "tokenizer" / "expanded"
        shards = sorted(str(p) for p in (self.w / "corpus" / "dedup").glob("*.jsonl.zst"))
        data = self.w / "data"
        self.hibari("data", "tokenize", "--input", *shards, "--tokenizer", expanded, "--output", data / "ja",
                    "--append-eod", "--workers", self.workers)
        self.hibari("data", "tokenize", "--input", DEMO_DATA / "english.jsonl.zst", "--tokenizer", expanded,
                    "--output", data / "en", "--append-eod")
        stats = {k: json.loads((data / f"{k}.json").read_text(encoding="utf-8")) for k in ("ja", "en")}
        self.results["data"] = {k: {"documents": v["documents"], "tokens": v["tokens"],
                                    "characters": v.get("characters"), "dtype": v.get("dtype")}
                                for k, v in stats.items()}
        ja, en = stats["ja"], stats["en"]
        cpt = f", {ja['characters'] / ja['tokens']:.2f} chars/token" if ja.get("characters") else ""
        return (f"Japanese {ja['documents']} docs / {ja['tokens']:,} tokens{cpt}; English replay {en['documents']} "
                f"docs / {en['tokens']:,} tokens; training blend 90% / 10%")

    # -- step 5 ---------------------------------------------------------------------------------------------------
    def train_command(self) -> list[str]:
        run = self.w / "run"
        data = self.w / "data"
        words = ["launch", "local", "--nproc", str(self.nproc), str(DEMO_CONFIG), f"run.dir={run}",
                 f"init.from={self.w / 'model' / 'init'}",
                 f"data.blend=[[0.9, {data / 'ja'}], [0.1, {data / 'en'}]]", f"train.steps={self.steps}",
                 *LAYOUTS[self.layout]]
        if self.quick:
            words += QUICK_TRAIN_OVERRIDES
        return words

    def step_train(self) -> str:
        for words in (("convert", "hf-to-hibari"), ("launch", "local"), ("train",)):
            self.require(*words)
        if not DEMO_CONFIG.is_file():
            raise HibariError(f"{DEMO_CONFIG}: the demo training config is missing (hibari must run from a "
                              f"source checkout: pip install -e .)")
        self.hibari("convert", "hf-to-hibari", "--hf", self.w / "model" / "expanded_hf", "--out",
                    self.w / "model" / "init")
        words = self.train_command()
        run = self.w / "run"
        stop_at = max(1, self.steps // 2) if self.preempt else None
        t0 = time.perf_counter()
        if stop_at is None:
            self.hibari(*words)
            preempted_at = None
        else:
            print(f"(the first launch is preempted with SIGUSR1 after step {stop_at}: it saves a checkpoint and "
                  f"stops; the second launch resumes from it)", flush=True)
            preempted_at = self._launch_and_preempt(words, run, stop_at)
            if preempted_at is None:
                print("\n(the run finished before the preemption signal; the relaunch finds the final "
                      "checkpoint and has nothing left to do)", flush=True)
            else:
                print(f"\n(preempted at step {preempted_at}; relaunching the same command resumes from the "
                      f"checkpoint)", flush=True)
            self.hibari(*words)
        train_seconds = time.perf_counter() - t0
        metrics = read_metrics(run)
        if not metrics:
            raise HibariError(f"step 5 (train) failed: {run}/metrics.jsonl has no steps")
        losses = [m["loss"] for m in metrics]
        tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        self.results["train"] = {
            "steps": metrics[-1]["step"], "first_loss": losses[0], "last_loss": losses[-1],
            "losses": losses, "val_losses": {m["step"]: m["val_loss"] for m in metrics if m.get("val_loss")},
            "lr": [m["lr"] for m in metrics], "tokens_per_s": tps,
            "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
            "precision": sorted({m.get("precision") for m in metrics if m.get("precision")}),
            "preempted_at": preempted_at, "checkpoints": checkpoints, "seconds": round(train_seconds, 1)}
        t = self.results["train"]
        resume = f", preempted at step {preempted_at} and resumed" if preempted_at else ""
        return (f"{t['steps']} steps, {self.nproc} processes ({self.layout}), NVFP4 (first/last block BF16): loss "
                f"{t['first_loss']:.3f} -> {t['last_loss']:.3f}{resume}; median {t['median_tokens_per_s']:.0f} "
                f"tokens/s; checkpoints {', '.join(checkpoints)}")

    def _launch_and_preempt(self, words: list[str], run: Path, stop_at: int) -> int | None:
        shown = _shown(words)
        self.current.commands.append(shown[2:])
        print(shown, flush=True)
        proc = subprocess.Popen(hibari_argv(words), env=self.env)
        signalled = False
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if signalled:
                    continue
                done = read_metrics(run)
                if done and done[-1]["step"] >= stop_at:
                    # the real preemption path: the launcher forwards SIGUSR1 (as from SLURM --signal=USR1@N) to
                    # every rank, which saves a checkpoint at the end of its step and stops
                    proc.send_signal(signal.SIGUSR1)
                    signalled = True
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        if proc.returncode != 0:
            raise HibariError(f"step 5 (train) failed: `hibari launch local` exited with status {proc.returncode} "
                              f"(its output is above)")
        if not signalled:  # the run ended before it reached `stop_at`: nothing was preempted
            return None
        metrics = read_metrics(run)
        return metrics[-1]["step"] if metrics else 0

    # -- step 6 ---------------------------------------------------------------------------------------------------
    def step_export(self) -> str:
        self.require("convert", "hibari-to-hf")
        run = self.w / "run"
        latest = _latest_checkpoint(run / "checkpoints")
        out = self.w / "export" / "hf"
        self.hibari("convert", "hibari-to-hf", "--ckpt", latest, "--out", out, "--tokenizer",
                    self.w / "tokenizer" / "expanded", "--dtype", "fp32")
        before = generate(self.w / "model" / "expanded_hf", PROMPTS, self.gen_tokens, desc="generate (before)")
        after = generate(out, PROMPTS, self.gen_tokens, desc="generate (after)")
        self.results["export"] = {"checkpoint": str(latest), "hf_dir": str(out),
                                  "generations": [{"prompt": p, "before": b, "after": a}
                                                  for p, b, a in zip(PROMPTS, before, after)]}
        print("\nJapanese continuations (seeded sampling), before -> after continual pretraining:")
        for p, b, a in zip(PROMPTS, before, after):
            print(f"  prompt: {p}\n    before: {b!r}\n    after:  {a!r}")
        return f"exported {latest.name} to {out}; loaded with transformers and generated: {PROMPTS[0]}{after[0]}"

    # -- step 7 ---------------------------------------------------------------------------------------------------
    def step_report(self) -> str:
        files = write_report(self.w, self.results, self.step_log)
        return f"{self.w / 'report.md'} + {', '.join(f.name for f in files)}"



def process_cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sp_vocab_size(tok_dir: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model")).get_piece_size()


def _latest_checkpoint(root: Path) -> Path:
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        path = Path(name) if Path(name).is_absolute() else root / name
        if path.is_dir():
            return path
    steps = sorted(root.glob("step_*"))
    if not steps:
        raise HibariError(f"{root}: no training checkpoint (step_*) found")
    return steps[-1]

