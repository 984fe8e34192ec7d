"""SLURM launch, requeue/resume and array jobs against a real SLURM cluster (munge + slurmctld + two slurmd nodes
on loopback, started by tests/slurm/cluster.sh). Skipped, with the reason printed, when the cluster cannot start
(no root / no apt / no SLURM packages); CI starts it through tests/slurm/ci_up.sh, so there they run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hibari.errors import HibariError

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_DIR = os.environ.get("HIBARI_SLURM_DIR", "/tmp/hibari-slurm")
TINY = REPO / "configs" / "tiny.yaml"
# DP2 x TP2 on 2 nodes x 2 tasks; 8 steps with a checkpoint every 2 (CPU fp32, deterministic)
TRAIN_OVERRIDES = ["train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=8", "train.eval_interval=0",
                   "parallel.tp=2", "log.plot=false", "log.progress=false", "model.n_layers=2"]
JOB_TIMEOUT = 240

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster():
    """SLURM_CONF of a running test cluster; started here (and stopped afterwards) unless it already runs."""
    if shutil.which("bash") is None:
        pytest.skip("SLURM cluster tests: bash not found")
    env = dict(os.environ, HIBARI_SLURM_DIR=SLURM_DIR)
    was_up = subprocess.run(["bash", str(CLUSTER_SH), "status"], env=env).returncode == 0
    if not was_up:
        proc = subprocess.run(["bash", str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            cleanup = [i for i, ln in enumerate(lines) if "start failed; cleaning up" in ln]
            why = lines[:cleanup[0]][-2:] if cleanup and cleanup[0] > 0 else lines[-2:]
            reason = "SLURM test cluster did not start: " + (" / ".join(why) or f"exit {proc.returncode}")
            print(reason, file=sys.stderr)
            pytest.skip(reason)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = f"{SLURM_DIR}/slurm.conf"
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if not was_up:
            subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True)


def hibari(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=JOB_TIMEOUT, **kw)


def hibari_bg(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


def launch_args(run_dir: Path, *extra: str) -> list[str]:
    return ["launch", "slurm", str(TINY), f"run.dir={run_dir}", *TRAIN_OVERRIDES, "--nodes", "2",
            "--tasks-per-node", "2", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def job_id_from(stdout: str) -> int:
    for line in stdout.splitlines():
        if line.startswith("submitted job "):
            return int(line.split()[2])
    raise AssertionError(f"no job id in {stdout!r}")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_stdout_until_job(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()
    assert line.startswith("submitted job "), line + proc.stderr.read()
    return int(line.split()[2])


# --------------------------------------------------------------------------------------------------------------
# training: DP2 x TP2 on 2 nodes, failed rank, resubmit, preemption + requeue


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):
    """One uninterrupted 8-step run: the reference for the resume tests."""
    run = tmp_path_factory.mktemp("slurm-train") / "run"
    r = hibari(*launch_args(run, "--wait"))
    assert r.returncode == 0, r.stdout + r.stderr
    return run, job_id_from(r.stdout), r.stdout


def test_train_two_nodes_dp2_tp2(uninterrupted):
    run, job, stdout = uninterrupted
    assert "world 4 = dp 2 (replicate 1 x shard 2) x tp 2 x pp 1" in stdout
    assert f"job {job} finished (1 attempt)" in stdout
    loss = losses(run)
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.2, loss
    assert (run / "checkpoints" / "latest").read_text().strip().endswith("step_00000008")
    assert (run / "checkpoints" / "step_00000008" / "hibari_model.json").is_file()
    batch_log = (run / "slurm" / f"job-{job}.log").read_text()
    assert f"master 127.0.0.1:{15000 + job % 20000}" in batch_log  # n1 resolved through scontrol (NodeAddr)
    assert f"hibari: job {job} finished: all ranks exited with code 0" in batch_log
    attempt = run / "slurm" / str(job) / "attempt-0"
    hosts = {}
    for rank in range(4):
        first = (attempt / f"rank-{rank}.log").read_text().splitlines()[0]
        hosts[rank] = first.split(" on ")[1].split(":")[0]
    assert hosts == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}
    assert "trained to step 8" in (attempt / "rank-0.log").read_text()


def test_killed_rank_fails_the_job_clearly_and_resubmit_resumes(uninterrupted, tmp_path):
    ref_run, _, _ = uninterrupted
    run = tmp_path / "run"
    proc = hibari_bg(*launch_args(run, "--wait"))
    try:
        job = read_stdout_until_job(proc)
        attempt = run / "slurm" / str(job) / "attempt-0"
        # kill as soon as the first checkpoint exists: 6 more steps and saves remain, plenty of time
        wait_for(lambda: (run / "checkpoints" / "latest").is_file(), JOB_TIMEOUT, "the first checkpoint", poll=0.05)
        pid = int((attempt / "rank-3.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # rank 3 runs on n2 (a local process on this test cluster)
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out + err
    msg = err.strip().splitlines()[-1]
    assert msg.startswith(f"hibari: error: job {job} failed: rank 3 on host n2 was killed by SIGKILL"), err
    assert f"{attempt}/rank-3.log" in msg
    batch_log = (run / "slurm" / f"job-{job}.log").read_text()
    assert f"hibari: error: job {job} failed: rank 3 on host n2 was killed by SIGKILL" in batch_log
    saved = (run / "checkpoints" / "latest").read_text().strip()
    saved_step = int(saved.rsplit("_", 1)[1])
    assert 2 <= saved_step < 8, saved

    again = hibari(*launch_args(run, "--wait"))
    assert again.returncode == 0, again.stdout + again.stderr
    job2 = job_id_from(again.stdout)
    rank0 = (run / "slurm" / str(job2) / "attempt-0" / "rank-0.log").read_text()
    assert f"resuming from {run}/checkpoints/" in rank0
    resumed_step = int(rank0.split("resuming from ")[1].split("(step ")[1].split(")")[0])
    assert resumed_step >= saved_step
    got, ref = losses(run), losses(ref_run)
    assert sorted(got) == list(range(1, 9))
    assert got[8] == ref[8], (got, ref)  # CPU fp32, same layout: bit-identical to the uninterrupted run


def test_preemption_warning_checkpoints_requeues_and_resumes(uninterrupted, tmp_path):
    ref_run, _, _ = uninterrupted
    run = tmp_path / "run"
    proc = hibari_bg(*launch_args(run, "--requeue", "--wait"))
    try:
        job = read_stdout_until_job(proc)
        # the warning must reach a training loop that runs (SLURM would send it --signal-seconds before the end)
        wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip(),
                 JOB_TIMEOUT, "the first training step")
        subprocess.run(["scancel", "--signal=USR1", str(job)], check=True)
        # SLURM holds a requeued job for cred_expire + 1 s (the test cluster sets cred_expire=5; default 120)
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert f"job {job} finished (2 attempts)" in out
    first = json.loads((run / "slurm" / str(job) / "attempt-0" / "outcome.json").read_text())
    assert first["outcome"] == "requeued"
    rank0_first = (run / "slurm" / str(job) / "attempt-0" / "rank-0.log").read_text()
    assert "SIGUSR1: saved step" in rank0_first
    stopped_at = int(rank0_first.split("SIGUSR1: saved step ")[1].split(",")[0])
    assert stopped_at < 8
    rank0_second = (run / "slurm" / str(job) / "attempt-1" / "rank-0.log").read_text()
    assert f"(step {stopped_at})" in rank0_second and "resuming from" in rank0_second
    batch_log = (run / "slurm" / f"job-{job}.log").read_text()
    assert "requeueing" in batch_log and f"hibari: job {job} finished" in batch_log
    got, ref = losses(run), losses(ref_run)
    assert sorted(got) == list(range(1, 9)) and got[8] == ref[8], (got, ref)


def test_unknown_partition_is_one_line(slurm_cluster, tmp_path):
    r = hibari(*launch_args(tmp_path / "run", "--partition", "nosuchpartition"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hibari: error: sbatch rejected submit-")
    assert "Invalid partition name specified" in lines[0]


# --------------------------------------------------------------------------------------------------------------
# array jobs for corpus work


def record_execution(log: str, task_id: str) -> None:
    with open(log, "a", encoding="utf-8") as f:  # O_APPEND: concurrent elements may write
        f.write(task_id + "\n")


def write_shard(index: int, out_dir: str, log: str, fail_until: str | None = None) -> dict:
    """A corpus-like task: one output shard per index. `fail_until`: fail while that file is absent... once."""
    from hibari.io import write_jsonl

    record_execution(log, f"s{index}")
    if fail_until is not None:
        flag = Path(fail_until)
        if not flag.exists():
            flag.touch()
            raise ValueError(f"shard {index}: transient failure")
    docs = [{"id": f"{index}-{i}", "text": "吾輩は猫である。" * (i + 1)} for i in range(3)]
    n = write_jsonl(Path(out_dir) / f"shard-{index:03d}.jsonl", docs)
    return {"shard": index, "docs": n}


def always_fails(index: int, log: str, unless: str) -> dict:
    record_execution(log, f"bad{index}")
    if not Path(unless).exists():
        raise ValueError(f"shard {index}: corrupt input")
    return {"shard": index, "docs": 0}


def _executions(log: Path) -> list[str]:
    return sorted(log.read_text().split()) if log.is_file() else []


def _strip_times(x):
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if not k.endswith("_s")}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def test_array_job_over_warc_files_equals_local_executor(slurm_cluster, tmp_path):
    from corpus_warc_fixtures import article_html, english_html, http_response, spam_html, write_warc
    from data_pipeline.corpus.config import CleanConfig
    from data_pipeline.corpus.pipeline import clean_shard
    from data_pipeline.executor import Task, run_local
    from hibari.io import read_jsonl
    from data_pipeline.executor.slurm import SlurmArrayOptions, run_slurm

    (tmp_path / "in").mkdir()
    keys = ["tea", "library", "bread"]
    warcs = []
    for i in range(4):
        pages = [(f"https://news{i}.example.jp/{k}", http_response(article_html(k).encode())) for k in keys[i % 3:]]
        pages += [(f"https://s{i}.example.jp/sale", http_response(spam_html().encode())),
                  (f"https://en{i}.example.com/", http_response(english_html().encode()))]
        warcs.append(write_warc(tmp_path / "in" / f"CC-MAIN-test-{i:05d}.warc.gz", pages))
    cfg_data = CleanConfig().model_dump(mode="json")

    def tasks(out: Path) -> list:
        out.mkdir()
        return [Task(task_id=w.name.split(".")[0], fn=clean_shard,
                     args=(str(w), str(out / (w.name.split(".")[0] + ".jsonl.zst")), cfg_data, False))
                for w in warcs]

    local = run_local(tasks(tmp_path / "local"), tmp_path / "local" / ".state", workers=1, show_progress=False)
    opts = SlurmArrayOptions(max_array_size=2, poll_seconds=0.3)  # 4 shards -> 2 array elements of 2 shards
    slurm = run_slurm(tasks(tmp_path / "slurm"), tmp_path / "slurm" / ".state", desc="corpus clean",
                      show_progress=False, options=opts)
    assert list(slurm) == list(local)
    assert _strip_times(slurm) == _strip_times(local)
    total = 0
    for w in warcs:
        name = w.name.split(".")[0] + ".jsonl.zst"
        a = list(read_jsonl(tmp_path / "local" / name))
        b = list(read_jsonl(tmp_path / "slurm" / name))
        assert a == b
        total += len(b)
    assert total > 0
    stage_dirs = list((tmp_path / "slurm" / ".state" / "slurm").iterdir())
    assert len(stage_dirs) == 1
    logs = sorted(p.name for p in (stage_dirs[0] / "logs").iterdir())
    assert len(logs) == 2 and logs[0].endswith("_0.log") and logs[1].endswith("_1.log")  # one job, 2 elements
    st = hibari("corpus", "status", str(tmp_path / "slurm" / ".state"))
    assert st.returncode == 0 and "corpus clean: 4 tasks: 4 done, 0 failed, 0 pending" in st.stdout


def test_array_retries_failures_and_resubmit_does_only_what_is_missing(slurm_cluster, tmp_path):
    from data_pipeline.executor import Task, is_done
    from data_pipeline.executor.slurm import SlurmArrayOptions, run_slurm

    out = tmp_path / "out"
    out.mkdir()
    state = tmp_path / "state"
    log = tmp_path / "executions.txt"
    flag = tmp_path / "transient-failed-once"
    tasks = [Task(f"s{i}", write_shard, (i, str(out), str(log), str(flag) if i == 2 else None)) for i in range(5)]
    fixed = tmp_path / "input-fixed"
    bad = Task("bad5", always_fails, (5, str(log), str(fixed)))
    opts = SlurmArrayOptions(max_array_size=2, poll_seconds=0.3, retries=1)

    with pytest.raises(HibariError) as err:
        run_slurm(tasks + [bad], state, desc="shards", show_progress=False, options=opts)
    msg = str(err.value)
    assert msg.startswith("task bad5 failed on n") and "after 2 attempts: ValueError: shard 5: corrupt input" in msg
    assert "completed tasks are kept and the same command redoes only the failed ones" in msg
    # s2 failed once and was retried in the second array; bad5 ran in both
    assert _executions(log) == sorted(["s0", "s1", "s2", "s2", "s3", "s4", "bad5", "bad5"])
    assert all(is_done(state, t.task_id) for t in tasks) and not is_done(state, "bad5")
    assert sorted(p.name for p in out.iterdir()) == [f"shard-{i:03d}.jsonl" for i in range(5)]
    st = hibari("corpus", "status", str(state))
    assert "shards: 6 tasks: 5 done, 1 failed, 0 pending" in st.stdout
    assert "failed bad5: ValueError: shard 5: corrupt input (host n" in st.stdout

    fixed.touch()  # the input is repaired: a resubmit runs only the missing task
    log.unlink()
    result = run_slurm(tasks + [bad], state, desc="shards", show_progress=False, options=opts)
    assert _executions(log) == ["bad5"]
    assert result["bad5"] == {"shard": 5, "docs": 0} and result["s3"] == {"shard": 3, "docs": 3}
    assert not (state / "failed" / "bad5.json").exists()
    st = hibari("corpus", "status", str(state))
    assert "shards: 6 tasks: 6 done, 0 failed, 0 pending" in st.stdout


def test_data_tokenize_as_array_job_equals_local(slurm_cluster, tmp_path):
    """`data tokenize --executor slurm` comes with the one executor: same parts, same merged bytes as local."""
    from data_pipeline.executor.slurm import SlurmArrayOptions, run_slurm
    from data_pipeline.indexed.tokenize import tokenize_corpus
    from tokenizer_utils import english_lines, japanese_lines, make_base_tokenizer, write_corpus

    tok = make_base_tokenizer(tmp_path / "tok")
    shards = [str(write_corpus(tmp_path / f"s{i}.jsonl.zst", (english_lines if i % 2 else japanese_lines)(20, seed=i)))
              for i in range(3)]
    local = tokenize_corpus(shards, str(tok), str(tmp_path / "local"), workers=1, show_progress=False)
    opts = SlurmArrayOptions(max_array_size=2, poll_seconds=0.3)

    def runner(tasks, state_dir, workers=1, desc="tasks", show_progress=True):
        return run_slurm(tasks, state_dir, workers, desc=desc, show_progress=show_progress, options=opts)

    on_slurm = tokenize_corpus(shards, str(tok), str(tmp_path / "slurm"), show_progress=False, runner=runner,
                               keep_parts=True)
    assert on_slurm["documents"] == local["documents"] == 60 and on_slurm["tokens"] == local["tokens"] > 60
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"slurm{ext}").read_bytes() == (tmp_path / f"local{ext}").read_bytes()
    logs = list((tmp_path / "slurm.parts" / "slurm").glob("*/logs/*.log"))
    assert len(logs) == 2  # 3 shards in 2 array elements
