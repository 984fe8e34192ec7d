"""SLURM launch pieces that need no cluster: sbatch rendering, checks before submitting, failure reports, array
ranges and the status summary. The real-cluster tests are in test_slurm_cluster.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hibari.errors import HibariError
from hibari.slurm import one_line
from launch.slurm_submit import MASTER_PORT_BASE, MASTER_PORT_SPAN, SlurmJobSpec, render_sbatch, sanitize_job_name
from launch.slurm_supervisor import describe_failure, finish_main, first_failure
from data_pipeline.executor.slurm import SlurmArrayOptions, render_array_script, split_ranges
from data_pipeline.executor.status import stage_name, status_summary

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def hibari(*argv: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO)


def fake_sbatch_env(tmp_path: Path) -> tuple[dict, Path]:
    """PATH with an `sbatch` that only records that it was called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    called = tmp_path / "sbatch-called"
    (bindir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {called}\necho 42\n")
    (bindir / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin")
    return env, called


def test_dry_run_renders_one_task_per_gpu(tmp_path):
    run = tmp_path / "run"
    r = hibari("launch", "slurm", str(TINY), f"run.dir={run}", "parallel.tp=2", "--nodes", "2", "--gpus-per-node",
               "4", "--partition", "gpu", "--account", "proj", "--time", "1:00:00", "--cpus-per-task", "8",
               "--requeue", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=1:00:00", "#SBATCH --requeue", "#SBATCH --signal=USR1@120",
                 f"#SBATCH --output={run}/slurm/job-%j.log"):
        assert line in out.splitlines(), line
    assert "world 8 = dp 4" in out and "tp 2" in out
    assert "srun --kill-on-bad-exit=1" in out and "rank-%t.log" in out
    assert "-m launch.slurm_supervisor rank --" in out and "-m launch.cli train" in out
    assert "finish --log-dir" in out and "--requeue" in out.split("finish --log-dir")[1]
    assert not run.exists(), "--dry-run must not write anything"
    script = out[out.index("#!/bin/bash"):]
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_cpu_cluster_tasks_per_node_and_no_requeue(tmp_path):
    r = hibari("launch", "slurm", str(TINY), f"run.dir={tmp_path / 'r'}", "train.global_batch_size=12", "--nodes",
               "3", "--tasks-per-node", "2", "--signal-seconds", "0", "--sbatch-arg=--qos=low", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --no-requeue" in lines
    assert "#SBATCH --qos=low" in lines
    assert not any("gpus-per-node" in ln or "--signal=" in ln for ln in lines)


def test_master_port_formula_matches_hibari_env():
    from hibari import env as dist

    assert (MASTER_PORT_BASE, MASTER_PORT_SPAN) == (dist.SLURM_PORT_BASE, dist.SLURM_PORT_SPAN)
    script = render_sbatch(SlurmJobSpec(nodes=1, tasks_per_node=1), Path("/r"), ["true"], Path("/w"))
    snippet = [ln for ln in script.splitlines() if ln.startswith("export MASTER_PORT=")][0]
    out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID=123457; {snippet}; echo $MASTER_PORT"],
                         capture_output=True, text=True).stdout.strip()
    env = dist.torchrun_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "123457",
                                        "SLURM_JOB_NODELIST": "n1"})
    assert out == env["MASTER_PORT"]


def test_world_size_that_does_not_factor_fails_before_submitting(tmp_path):
    env, called = fake_sbatch_env(tmp_path)
    run = tmp_path / "run"
    r = hibari("launch", "slurm", str(TINY), f"run.dir={run}", "parallel.tp=2", "--nodes", "3",
               "--tasks-per-node", "1", env=env)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hibari: error: 3 ranks"), r.stderr
    assert "not divisible" in err[0]
    assert not called.exists() and not run.exists()


def test_batch_that_does_not_divide_fails_before_submitting(tmp_path):
    env, called = fake_sbatch_env(tmp_path)
    r = hibari("launch", "slurm", str(TINY), f"run.dir={tmp_path / 'run'}", "train.global_batch_size=6",
               "--nodes", "2", "--tasks-per-node", "2", env=env)
    assert r.returncode == 2 and "train.global_batch_size" in r.stderr
    assert not called.exists()


def test_sbatch_missing_from_path(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # python is called by absolute path
    run = tmp_path / "run"
    r = hibari("launch", "slurm", str(TINY), f"run.dir={run}", "--nodes", "1", "--tasks-per-node", "1", env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "hibari: error: sbatch not found on PATH: run on a SLURM login node (or add the SLURM client tools to "
        "PATH); `hibari launch slurm ... --dry-run` prints the batch script without submitting"]
    assert not run.exists()


def test_gpus_and_tasks_per_node_are_exclusive(tmp_path):
    r = hibari("launch", "slurm", str(TINY), "--nodes", "1", "--gpus-per-node", "2", "--tasks-per-node", "2",
               "--dry-run")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_submission_prints_job_id_and_logs(tmp_path):
    env, called = fake_sbatch_env(tmp_path)
    run = tmp_path / "run"
    r = hibari("launch", "slurm", str(TINY), f"run.dir={run}", "--nodes", "1", "--tasks-per-node", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert "submitted job 42" in r.stdout and f"{run}/slurm/job-42.log" in r.stdout
    scripts = list((run / "slurm").glob("submit-*.sbatch"))
    configs = list((run / "slurm").glob("config-*.yaml"))
    assert len(scripts) == 1 and len(configs) == 1
    assert str(configs[0]) in scripts[0].read_text()
    assert "--parsable" in called.read_text()


def _failure(log_dir: Path, rank: int, ended: float, terminated: bool, **extra) -> None:
    rec = {"rank": rank, "host": f"n{rank // 2 + 1}", "ended": ended, "terminated_by_slurm": terminated, **extra}
    (log_dir / f"failed-rank-{rank}.json").write_text(json.dumps(rec))


def test_first_failure_names_the_rank_that_failed_first(tmp_path):
    _failure(tmp_path, 0, 10.0, True, exit_code=143, signal="SIGTERM")
    _failure(tmp_path, 1, 9.5, False, exit_code=1)  # saw the broken connection, after rank 3 died
    _failure(tmp_path, 3, 9.0, False, exit_code=137, signal="SIGKILL")
    rec = first_failure(tmp_path)
    assert rec["rank"] == 3 and rec["other_failed_ranks"] == [0, 1]
    msg = describe_failure(rec, tmp_path)
    assert msg.startswith("rank 3 on host n2 was killed by SIGKILL; ranks 0, 1 stopped after it")
    assert first_failure(tmp_path / "nothing") is None


def test_finish_reports_failure_and_outcome(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    _failure(tmp_path, 2, 5.0, False, exit_code=3)
    assert finish_main(tmp_path, 3, requeue=True) == 3
    out = capsys.readouterr().out
    assert out.strip() == ("hibari: error: job 7 failed: rank 2 on host n2 exited with code 3 "
                           f"(log: {tmp_path}/rank-2.log)")
    assert json.loads((tmp_path / "outcome.json").read_text())["outcome"] == "failed"


def test_failure_report_carries_the_ranks_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    _failure(tmp_path, 1, 5.0, False, exit_code=2, error="hibari: error: data.blend: /d/ja.idx: no such file")
    _failure(tmp_path, 0, 6.0, True, exit_code=143, signal="SIGTERM")
    assert finish_main(tmp_path, 2, requeue=False) == 2
    assert capsys.readouterr().out.strip() == (
        "hibari: error: job 9 failed: rank 1 on host n1 exited with code 2: data.blend: /d/ja.idx: no such file; "
        f"ranks 0 stopped after it (log: {tmp_path}/rank-1.log)")


def test_rank_supervisor_records_the_error_line(tmp_path):
    """`python -m launch.slurm_supervisor rank -- hibari ...`: the rank's one-line error lands in its failure record
    and in its log (stderr), once."""
    env = dict(os.environ, SLURM_PROCID="3", SLURM_NTASKS="4", SLURMD_NODENAME="n2",
               HIBARI_SLURM_LOG_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "launch.slurm_supervisor", "rank", "--", sys.executable, "-m",
                        "launch.cli", "train", str(tmp_path / "missing.yaml")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    rec = json.loads((tmp_path / "failed-rank-3.json").read_text())
    assert rec["error"].startswith("hibari: error: ") and "missing.yaml" in rec["error"]
    assert r.stderr.count(rec["error"]) == 1 and (tmp_path / "rank-3.pid").read_text().strip().isdigit()


def test_finish_without_requeue_after_preemption(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    (tmp_path / "preempted-rank-0.json").write_text("{}")
    assert finish_main(tmp_path, 0, requeue=False) == 0
    assert "resubmit the same command to resume" in capsys.readouterr().out
    assert json.loads((tmp_path / "outcome.json").read_text())["outcome"] == "stopped"


def test_one_line_keeps_slurm_error():
    text = "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    assert one_line(text) == "sbatch: error: Batch job submission failed: Invalid partition name specified"
    assert one_line("a\n\nlast\n") == "last"


def test_spec_checks():
    with pytest.raises(HibariError, match="--nodes"):
        SlurmJobSpec(nodes=0, tasks_per_node=1).check()
    with pytest.raises(HibariError, match="one rank per GPU"):
        SlurmJobSpec(nodes=1, tasks_per_node=2, gpus_per_node=4).check()


@pytest.mark.parametrize("n,parts", [(10, 3), (3, 8), (1, 1), (1000, 7), (5, 5)])
def test_split_ranges_cover_everything_contiguously(n, parts):
    ranges = split_ranges(n, parts)
    assert len(ranges) == min(n, parts)
    assert [i for r in ranges for i in r] == list(range(n))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_stage_name_is_stable_and_distinct():
    a = stage_name("dedup signatures", ["s0", "s1"])
    assert a == stage_name("dedup signatures", ["s0", "s1"]) and a.startswith("dedup-signatures-")
    assert a != stage_name("dedup signatures", ["s0", "s2"])


def test_array_script(tmp_path):
    opts = SlurmArrayOptions(partition="cpu", time="1:00:00", mem="4G", max_running=3, cpus_per_task=2)
    s = render_array_script(opts, 5, tmp_path / "round-000.json", tmp_path / "logs", tmp_path)
    lines = s.splitlines()
    for want in ("#SBATCH --array=0-4%3", "#SBATCH --cpus-per-task=2", "#SBATCH --partition=cpu",
                 "#SBATCH --time=1:00:00", "#SBATCH --mem=4G", f"#SBATCH --output={tmp_path}/logs/%A_%a.log"):
        assert want in lines, want
    assert '"$SLURM_ARRAY_TASK_ID"' in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


def test_status_summary_counts_markers(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))  # no squeue: job states are simply not shown
    stage = tmp_path / "slurm" / "clean-abc"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text(json.dumps({"desc": "clean", "task_ids": ["a", "b", "c", "d"]}))
    (tmp_path / "done").mkdir()
    (tmp_path / "failed").mkdir()
    for t in ("a", "b", "x"):
        (tmp_path / "done" / f"{t}.json").write_text("{}")
    (tmp_path / "failed" / "c.json").write_text(json.dumps({"error": "ValueError: bad", "host": "n2"}))
    s = status_summary(tmp_path)
    st = s["stages"][0]
    assert (st["total"], st["done"], st["failed"], st["pending"]) == (4, 2, 1, 1)
    assert st["failed_tasks"] == ["c"] and s["done_without_manifest"] == 1
    r = hibari("corpus", "status", str(tmp_path), env=dict(os.environ, PATH=str(tmp_path / "nobin")))
    assert r.returncode == 0, r.stderr
    assert "clean: 4 tasks: 2 done, 1 failed, 1 pending" in r.stdout
    assert "failed c: ValueError: bad (host n2" in r.stdout
    bad = hibari("corpus", "status", str(tmp_path / "missing"))
    assert bad.returncode == 2 and "no such state directory" in bad.stderr


def test_executor_options_and_runner(tmp_path, monkeypatch):
    import argparse

    from data_pipeline.executor import run_local
    from data_pipeline.executor.options import add_executor_arguments, make_runner

    p = argparse.ArgumentParser()
    add_executor_arguments(p)
    args = p.parse_args(["--executor", "slurm", "--slurm-partition", "cpu", "--slurm-max-array-size", "4",
                         "--slurm-arg=--qos=low", "--slurm-retries", "0"])
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(HibariError, match="sbatch not found on PATH: .*--executor slurm needs them, or use --executor local"):
        make_runner(args)
    assert make_runner(p.parse_args([])) is run_local
    with pytest.raises(HibariError, match="--slurm-max-array-size: expected a positive integer"):
        make_runner(p.parse_args(["--executor", "slurm", "--slurm-max-array-size", "0"]))
    own = argparse.ArgumentParser()
    own.add_argument("--executor", choices=("local", "slurm"), default="local")
    add_executor_arguments(own, with_executor_choice=False)
    assert own.parse_args(["--executor", "slurm", "--slurm-mem", "4G"]).slurm_mem == "4G"


def test_values_in_the_batch_script_are_quoted_and_the_job_name_sanitised(tmp_path):
    """A run directory named `$(...)` / with backquotes and quotes stays a name: rendering, sbatch's directive parser
    (the same quote rules as the shell's) and running the script execute nothing it contains."""
    pwned = tmp_path / "PWNED"
    run = tmp_path / f"run $(touch {pwned}) `touch {pwned}` 'q' \"d\""
    r = hibari("launch", "slurm", "--nodes", "1", str(TINY), f"run.dir={run}", "--tasks-per-node", "2",
               "--job-name", "my job;$(touch x)", "--sbatch-arg=--comment=a b #c", "--dry-run")
    assert r.returncode == 0, r.stderr
    script = r.stdout[r.stdout.index("#!/bin/bash"):]
    directives = [shlex.split(ln[len("#SBATCH "):], comments=True) for ln in script.splitlines()
                  if ln.startswith("#SBATCH ")]
    assert all(len(words) == 1 for words in directives), directives
    words = [w[0] for w in directives]
    assert f"--output={run}/slurm/job-%j.log" in words and "--comment=a b #c" in words
    assert "--job-name=my-job-touch-x" in words
    assert sanitize_job_name("hibari-$(id)`x`") == "hibari-id-x" and sanitize_job_name("$$$") == "hibari"

    # run the body as the batch job would, with stand-ins for scontrol and srun
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun_args = tmp_path / "srun-args"
    (bindir / "scontrol").write_text("#!/bin/sh\n[ \"$2\" = hostnames ] && echo n1\nexit 0\n")
    (bindir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{srun_args}'\n")
    for tool in ("scontrol", "srun"):
        (bindir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin", SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n1",
               SLURM_NTASKS="2")
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not pwned.exists(), "a value in the batch script was executed"
    attempt = Path(f"{run}/slurm/77/attempt-0")
    assert json.loads((attempt / "outcome.json").read_text())["outcome"] == "finished"
    ran = srun_args.read_text().splitlines()
    snapshot = [a for a in ran if a.endswith(".yaml")]
    assert len(snapshot) == 1 and snapshot[0].startswith(f"{run}/slurm/config-"), ran


def _main(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """`hibari ARGV` in this process (no interpreter start-up): (exit code, stdout, stderr lines)."""
    from launch.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def test_overrides_anywhere_on_the_command_line(tmp_path, capsys, monkeypatch):
    """`a.b=v` before, between and after options, and before the config file, for train and both launchers."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, out, err = _main(["train", f"run.dir={tmp_path / 'a'}", str(TINY), "--check", "parallel.tp=2",
                          "model.n_layers=2"], capsys)
    assert rc == 0 and "tp 2" in out, err
    rc, out, err = _main(["launch", "local", str(TINY), "--nproc", "4", f"run.dir={tmp_path / 'b'}", "--check",
                          "parallel.tp=2"], capsys)
    assert rc == 0 and out.startswith("config ok: world 4 = dp 2") and "tp 2" in out, err
    rc, out, err = _main(["launch", "local", "--nproc", "2", str(TINY), "--check", "train.steps=-1",
                          f"run.dir={tmp_path}"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("hibari: error:") and "train.steps" in err[0]
    assert not (tmp_path / "b").exists()
    rc, out, err = _main(["launch", "local", "--nproc", "2", str(TINY), "--check", "--bogus"], capsys)
    assert rc == 2 and "unrecognized arguments: --bogus" in err[-1]


def _readme_launch_commands(section_start: str) -> list[list[str]]:
    """`hibari launch ...` commands of the first bash block after `section_start` in README.md (continuations
    joined, comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text[text.index(section_start):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [shlex.split(ln, comments=True)[1:] for ln in block.splitlines()
            if ln.strip().startswith("hibari launch ")]


@pytest.mark.slow
def test_readme_full_scale_recipe_launch_commands(tmp_path):
    """The README's full-scale recipe launch command, exactly as written (options first, overrides last), at tiny
    sizes: the config becomes configs/tiny.yaml, init.from a tiny checkpoint, and `--dry-run` submits nothing."""
    commands = _readme_launch_commands("### Full-scale recipe")
    assert commands and all(c[:2] == ["launch", "slurm"] for c in commands), commands
    init_run = tmp_path / "init-run"
    r = hibari("train", str(TINY), f"run.dir={init_run}", "train.steps=1", "model.n_layers=2", "log.plot=false",
               "log.progress=false", "train.eval_interval=0")
    assert r.returncode == 0, r.stderr
    init = init_run / "checkpoints" / "step_00000001"
    for words in commands:
        words = [str(TINY) if w.endswith(".yaml") else w for w in words]
        words = [f"run.dir={tmp_path / 'run'}" if w.startswith("run.dir=") else w for w in words]
        words = [f"init.from={init}" if w.startswith("init.from=") else w for w in words]
        # tiny sizes: the recipe's 2 nodes x 8 GPUs need a global batch that divides by 16 data-parallel ranks
        r = hibari(*words, "model.n_layers=2", "train.global_batch_size=32", "train.micro_batch_size=1",
                   "--dry-run")
        assert r.returncode == 0, (words, r.stderr)
        assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --gpus-per-node=8" in r.stdout
        assert not (tmp_path / "run").exists()


def test_check_and_dry_run_run_the_training_preflight(tmp_path, capsys):
    """`launch local --check` and `launch slurm --dry-run` run the whole pre-flight (here: init.from is not a hibari
    checkpoint), not only the layout arithmetic; a real launch stops at the same line before starting a process."""
    bad = f"init.from={tmp_path / 'no-ckpt'}"
    run = tmp_path / "run"
    for argv in (["launch", "local", "--nproc", "2", str(TINY), f"run.dir={run}", "--check", bad],
                 ["launch", "slurm", str(TINY), "--nodes", "1", "--tasks-per-node", "2", f"run.dir={run}",
                  "--dry-run", bad],
                 ["launch", "local", "--nproc", "2", str(TINY), f"run.dir={run}", bad]):
        rc, out, err = _main(argv, capsys)
        assert rc == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith("hibari: error:") and "init.from" in err[0] and "no-ckpt" in err[0], err
        assert "rerun" not in err[0] and out == ""
    assert not run.exists()


def test_cuda_max_connections_only_for_tp_without_data_parallel():
    from parallel.dist import cuda_env

    def exported(gpu_env):
        script = render_sbatch(SlurmJobSpec(nodes=1, tasks_per_node=2, gpus_per_node=2), Path("/r"), ["true"],
                               Path("/w"), gpu_env=gpu_env)
        return {ln.split("=", 1)[0].removeprefix("export ") for ln in script.splitlines() if ln.startswith("export ")}

    assert "CUDA_DEVICE_MAX_CONNECTIONS" in exported(cuda_env(tp=2, dp=1))
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in exported(cuda_env(tp=2, dp=2))  # would serialise FSDP comms
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in exported(None)  # CPU clusters: no GPU defaults at all
    assert "PYTORCH_CUDA_ALLOC_CONF" in exported(cuda_env(tp=1, dp=8))
