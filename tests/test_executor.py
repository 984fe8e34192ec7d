"""The one executor (data_pipeline/executor): tasks are data, markers, failure messages, the SLURM element entry
point run from a JSON round file (no cluster needed), and interrupts of real `corpus clean` runs (SIGINT, and
SIGKILL of the parent: no orphan workers, rerun byte-identical)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.executor import Task, run_local
from data_pipeline.executor.slurm import SlurmArrayOptions, _write_round, element_main, render_array_script
from data_pipeline.executor.status import format_status, status_summary
from data_pipeline.executor.tasks import failure_error, is_done, marker_path
from hibari.errors import HibariError

REPO = Path(__file__).resolve().parents[1]


def write_text_task(path: str, text: str) -> dict:
    Path(path).write_text(text, encoding="utf-8")
    return {"path": path, "chars": len(text)}


def failing_task(kind: str) -> dict:
    if kind == "input":
        raise HibariError("shard.jsonl:3: invalid JSON (Expecting value at column 1)")
    raise RuntimeError("disk hiccup")


def test_tasks_are_json_data_not_callables(tmp_path):
    t = Task("a", write_text_task, (str(tmp_path / "a.txt"), "x"))
    assert t.fn == "test_executor:write_text_task"
    assert Task.from_json(json.loads(json.dumps(t.to_json()))) == t
    with pytest.raises(TypeError, match="top-level function"):
        Task("b", lambda: {})
    with pytest.raises(TypeError, match="JSON data"):
        Task("c", write_text_task, (tmp_path, "x"))  # a Path is not JSON: pass str(path)
    with pytest.raises(TypeError, match="JSON data"):
        Task("d", write_text_task, kwargs={"path": "p", "text": float("nan")})


def test_duplicate_task_ids_name_both_inputs(tmp_path):
    tasks = [Task("x", write_text_task, ("p", "t"), label="in/a/b.jsonl.zst"),
             Task("x", write_text_task, ("q", "t"), label="in/a__b.jsonl.zst")]
    with pytest.raises(HibariError, match=r"^in/a/b\.jsonl\.zst and in/a__b\.jsonl\.zst map to the same task id 'x'"):
        run_local(tasks, tmp_path, show_progress=False)


def test_dedup_shard_names_that_collide_are_one_line_error(tmp_path):
    from data_pipeline.dedup.pipeline import DedupConfig, run_dedup
    from hibari.io import write_jsonl

    (tmp_path / "in" / "a").mkdir(parents=True)
    rec = {"id": "1", "text": "テキスト", "url": "https://a.jp/", "date": "", "snapshot": "s"}
    write_jsonl(tmp_path / "in" / "a" / "b.jsonl.zst", [rec])
    write_jsonl(tmp_path / "in" / "a__b.jsonl.zst", [{**rec, "id": "2"}])
    with pytest.raises(HibariError) as err:
        run_dedup(tmp_path / "in", tmp_path / "out", DedupConfig(bands=2, rows=2, plot=False), show_progress=False)
    msg = str(err.value)
    assert "a/b.jsonl.zst and " in msg and "a__b.jsonl.zst map to the same task id" in msg and "\n" not in msg


def test_corrupt_or_stale_marker_is_not_done_and_redone(tmp_path):
    out = tmp_path / "a.txt"
    task = Task("a", write_text_task, (str(out), "hello"), fingerprint={"size": 5})
    run_local([task], tmp_path / "state", show_progress=False)
    marker = marker_path(tmp_path / "state", "a")
    assert is_done(tmp_path / "state", "a", {"size": 5}) and not is_done(tmp_path / "state", "a", {"size": 6})
    marker.write_text('{"task_id": "a", "stats": {"pa')  # cut by a crash or a full disk
    summary = status_summary(tmp_path / "state")
    assert summary["stages"][0]["done"] == 0 and summary["stages"][0]["pending"] == 1
    assert "corrupt done-marker a: counted as pending" in format_status(summary, tmp_path / "state")
    out.unlink()
    result = run_local([task], tmp_path / "state", show_progress=False)
    assert out.read_text() == "hello" and result["a"]["chars"] == 5 and is_done(tmp_path / "state", "a")


def test_failure_messages_no_rerun_hint_for_input_errors(tmp_path):
    tasks = [Task("ok", write_text_task, (str(tmp_path / "ok.txt"), "x")),
             Task("bad", failing_task, ("input",), label="shard.jsonl"),
             Task("flaky", failing_task, ("other",))]
    with pytest.raises(HibariError) as err:
        run_local(tasks, tmp_path / "state", workers=1, show_progress=False)
    msg = str(err.value)
    assert msg == "task shard.jsonl failed: shard.jsonl:3: invalid JSON (Expecting value at column 1) (and 1 more " \
                  "task failed)"
    assert is_done(tmp_path / "state", "ok")
    other = failure_error([(tasks[2], "RuntimeError: disk hiccup", False)])
    assert str(other).endswith("completed tasks are kept and the same command redoes only the failed ones")


def test_slurm_element_runs_a_json_round_file(tmp_path, monkeypatch):
    """The in-job entry point reads tasks as JSON data (no pickle) and writes the same markers as run_local."""
    state = tmp_path / "state"
    tasks = [Task(f"t{i}", write_text_task, (str(tmp_path / f"{i}.txt"), "abc" * i)) for i in range(3)]
    stage = tmp_path / "stage"
    stage.mkdir()
    round_file = _write_round(stage, 0, tasks, SlurmArrayOptions(max_array_size=2), state)
    meta = json.loads(round_file.read_text())
    assert meta["ranges"] == [[0, 2], [2, 3]] and meta["tasks"][1]["fn"] == "test_executor:write_text_task"
    assert not list(stage.glob("*.pkl"))
    script = render_array_script(SlurmArrayOptions(), 2, round_file, stage / "logs", tmp_path)
    assert f"-m data_pipeline.executor.slurm element {round_file}" in script
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    assert element_main(round_file, 0) == 0 and element_main(round_file, 1) == 0
    assert [is_done(state, t.task_id) for t in tasks] == [True, True, True]
    assert (tmp_path / "2.txt").read_text() == "abcabc"
    # the command-line form the batch script runs
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.executor.slurm", "element", str(round_file), "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "RuntimeWarning" not in proc.stderr, proc.stderr


def test_no_other_process_pool_in_data_pipeline():
    import re

    pool = re.compile(r"^\s*(import|from)\s+(multiprocessing|concurrent\.futures)\b", re.M)
    unpickle = re.compile(r"^\s*(import|from)\s+(pickle|cloudpickle|dill)\b|pickle\.loads?\(", re.M)
    pools, pickles = [], []
    for path in sorted((REPO / "data_pipeline").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO).as_posix()
        pools += [name] if pool.search(text) else []
        pickles += [name] if unpickle.search(text) else []
    assert pools == ["data_pipeline/executor/local.py"] and pickles == []


# ------------------------------------------------------------------------------------------------ interrupts
def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _running(pids: list[int]) -> list[int]:
    alive = []
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                alive.append(p)
        except (OSError, IndexError):
            pass
    return alive


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while _running(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _running(pids)


def _clean_cmd(inputs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "corpus", "clean", "--input", str(inputs / "*.warc.gz"), "--output",
            str(out), "--workers", "2", "--quiet"]


def _start_and_wait_for_first_shard(inputs: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(_clean_cmd(inputs, out), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    done = out / ".state" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and any(done.glob("*.json")):
            return proc
        time.sleep(0.01)
    raise AssertionError(f"no shard finished: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.jsonl.zst"))}


@pytest.mark.slow
def test_ctrl_c_and_parent_kill_stop_workers_and_rerun_is_identical(tmp_path):
    from corpus_warc_fixtures import article_html, http_response, write_warc

    inputs = tmp_path / "in"
    inputs.mkdir()
    keys = ["tea", "library", "bread"]
    for i in range(4):
        pages = [(f"https://s{i}.example.jp/{j}", http_response(article_html(keys[(i + j) % 3], f"記事{i}-{j}")
                                                                .encode())) for j in range(16)]
        write_warc(inputs / f"shard-{i:02d}.warc.gz", pages)
    ref = subprocess.run(_clean_cmd(inputs, tmp_path / "ref"), cwd=REPO, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    expected = _outputs(tmp_path / "ref")
    assert len(expected) == 8  # 4 shards + 4 ledgers

    # Ctrl-C: stops within 2 s, says what completed, no worker left, no partial file
    out = tmp_path / "int"
    proc = _start_and_wait_for_first_shard(inputs, out)
    workers = _descendants(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=30)
    stopped_s = time.monotonic() - t0
    err = proc.stderr.read()
    assert rc == 130 and stopped_s < 2.0, (rc, stopped_s, err)
    assert "hibari: interrupted" in err and "tasks completed before the interrupt" in err and "Traceback" not in err
    assert _wait_gone(workers, 3.0) == []
    assert not list(out.rglob("*.tmp-*"))
    assert subprocess.run(_clean_cmd(inputs, out), cwd=REPO, capture_output=True).returncode == 0
    assert _outputs(out) == expected

    # the parent killed outright: its workers notice and exit (no orphans); the rerun finishes identically
    out = tmp_path / "kill"
    proc = _start_and_wait_for_first_shard(inputs, out)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait(timeout=30)
    assert _wait_gone(workers, 3.0) == []
    rerun = subprocess.run(_clean_cmd(inputs, out), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _outputs(out) == expected and not list(out.rglob("*.tmp-*"))
