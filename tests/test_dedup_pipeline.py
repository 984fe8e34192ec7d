"""`hibari corpus dedup` end to end on shards written by the test: keep policies across snapshots, incremental
equals from scratch, exact duplicates, host filter, resume, CLI errors."""

import json
import shutil

import numpy as np
import pytest

from data_pipeline.dedup.pipeline import DedupConfig, run_dedup
from hibari.io import read_jsonl, write_jsonl
from hibari.errors import HibariError

KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)] + [chr(c) for c in range(0x3041, 0x3097)]
SNAPS = {"CC-MAIN-2023-14": "2023-03-25T10:00:00Z", "CC-MAIN-2023-23": "2023-06-02T08:30:00Z"}
SMALL = DedupConfig(bands=9, rows=4, plot=False)  # fewer bands: fewer tasks and files; the CLI test plots


def _text(rng, n=300):
    return "".join(rng.choice(KANJI, n))


def _near(rng, text, k=3):
    chars = list(text)
    for p in rng.choice(len(chars), k, replace=False):
        chars[p] = KANJI[rng.integers(len(KANJI))]
    return "".join(chars)


def _rec(doc_id, text, snap, host="example.jp", date=None):
    return {"id": doc_id, "text": text, "url": f"https://{host}/{doc_id}", "host": host,
            "date": SNAPS[snap] if date is None else date, "snapshot": snap, "warc_file": f"{snap}-0001.warc.gz"}


def make_snapshots(tmp_path, seed=0):
    """Two snapshots; 'shared' docs recur (exactly or nearly) in the newer one; 'dup' docs repeat inside one."""
    rng = np.random.default_rng(seed)
    shared = [_text(rng) for _ in range(12)]
    old = [_rec(f"old-{i}", t, "CC-MAIN-2023-14") for i, t in enumerate(shared)]
    old += [_rec(f"old-u{i}", _text(rng), "CC-MAIN-2023-14") for i in range(10)]
    old += [_rec("old-dup-a", shared[0], "CC-MAIN-2023-14", date="2023-03-20T00:00:00Z")]  # older exact copy
    new = [_rec(f"new-{i}", t if i % 2 else _near(rng, t), "CC-MAIN-2023-23") for i, t in enumerate(shared)]
    new += [_rec(f"new-u{i}", _text(rng), "CC-MAIN-2023-23") for i in range(10)]
    dirs = {}
    for name, recs in (("CC-MAIN-2023-14", old), ("CC-MAIN-2023-23", new)):
        d = tmp_path / name
        d.mkdir()
        half = len(recs) // 2
        write_jsonl(d / f"{name}-00000.jsonl.zst", recs[:half])
        write_jsonl(d / f"{name}-00001.jsonl.zst", recs[half:])
        dirs[name] = d
    both = tmp_path / "both"
    both.mkdir()
    for d in dirs.values():
        for f in d.iterdir():
            shutil.copy(f, both / f.name)
    return dirs["CC-MAIN-2023-14"], dirs["CC-MAIN-2023-23"], both


def read_output(out):
    shards = {p.name: [r.get("id") for r in read_jsonl(p)] for p in sorted(out.glob("*.jsonl.zst"))}
    removed = {r["id"]: (r["reason"], r["kept_id"])
               for p in sorted((out / "_dedup" / "removed").glob("*.jsonl.zst")) for r in read_jsonl(p)}
    return shards, removed


@pytest.mark.parametrize("keep", ["newest", "oldest"])
def test_keep_policy_across_two_snapshots(tmp_path, keep):
    _, _, both = make_snapshots(tmp_path)
    out = tmp_path / "out"
    report = run_dedup(both, out, SMALL.model_copy(update={"keep": keep}), show_progress=False)
    shards, removed = read_output(out)
    kept = {i for ids in shards.values() for i in ids}
    assert report["docs_in"] == 23 + 22 and report["docs_out"] == len(kept) == 45 - 13
    assert report["dup_removed"] == len(removed) == 13 and report["host_removed"] == 0
    # the output keeps the input schema and file names
    assert sorted(shards) == sorted(p.name for p in both.iterdir())
    first = next(read_jsonl(next(out.glob("*.jsonl.zst"))))
    assert set(first) == {"id", "text", "url", "host", "date", "snapshot", "warc_file"}
    for i in range(12):
        if keep == "newest":
            assert f"new-{i}" in kept and removed[f"old-{i}"] == ("near_duplicate", f"new-{i}")
        else:
            assert (i == 0 or f"old-{i}" not in removed) and removed[f"new-{i}"][1] == ("old-dup-a" if i == 0
                                                                                         else f"old-{i}")
    if keep == "newest":
        assert removed["old-dup-a"] == ("near_duplicate", "new-0")
    else:  # the oldest copy of cluster 0 is the exact copy dated 2023-03-20
        assert "old-dup-a" in kept and removed["old-0"] == ("near_duplicate", "old-dup-a")
    assert all(f"old-u{i}" in kept and f"new-u{i}" in kept for i in range(10))
    assert report["cluster_size_histogram"] == {"2": 11, "3": 1}


def test_incremental_equals_from_scratch(tmp_path):
    old_dir, new_dir, both = make_snapshots(tmp_path, seed=1)
    scratch = tmp_path / "scratch"
    run_dedup(both, scratch, SMALL, show_progress=False)
    first = tmp_path / "first"
    run_dedup(old_dir, first, SMALL, show_progress=False)
    second = tmp_path / "second"
    report = run_dedup(new_dir, second, SMALL, previous=first, show_progress=False)
    assert report["shards_new"] == 2 and report["shards"] == 4
    # earlier snapshot's signatures were reused, not recomputed
    assert not list((second / "_dedup" / "state" / "sig").glob("CC-MAIN-2023-14*"))
    assert read_output(second) == read_output(scratch)
    for name in read_output(scratch)[0]:
        assert list(read_jsonl(second / name)) == list(read_jsonl(scratch / name))


def test_exact_duplicates_all_removed(tmp_path):
    rng = np.random.default_rng(2)
    texts = [_text(rng, int(n)) for n in rng.integers(1, 600, 40)]
    inp = tmp_path / "in"
    inp.mkdir()
    recs = [_rec(f"d{c}-{i}", t, "CC-MAIN-2023-14") for c in range(3) for i, t in enumerate(texts)]
    write_jsonl(inp / "a.jsonl.zst", recs[:50])
    write_jsonl(inp / "b.jsonl.zst", recs[50:])
    report = run_dedup(inp, tmp_path / "out", DedupConfig(plot=False), show_progress=False)  # Swallow 40 x 20
    shards, removed = read_output(tmp_path / "out")
    assert report["dup_removed"] == 80 and len(removed) == 80
    kept = [i for ids in shards.values() for i in ids]
    assert sorted(int(i.split("-")[1]) for i in kept) == list(range(40))  # one copy of every text survives
    assert all(removed[r][1].split("-")[1] == r.split("-")[1] for r in removed)
    assert report["cluster_size_histogram"] == {"3": 40}


def test_host_filter_drops_copying_host_only(tmp_path):
    rng = np.random.default_rng(3)
    inp = tmp_path / "in"
    inp.mkdir()
    originals = [_text(rng) for _ in range(12)]
    recs = [_rec(f"orig-{i}", t, "CC-MAIN-2023-14", host="original.jp", date="2023-03-01T00:00:00Z")
            for i, t in enumerate(originals)]
    # mirror.jp: 11 near-copies (older, so the original is kept under newest), 1 page of its own, and the newest
    # copy of a page of victim.jp: kept by dedup at first, but its host is dropped, so the victim copy is kept
    recs += [_rec(f"mirror-{i}", _near(rng, t, 2), "CC-MAIN-2023-14", host="mirror.jp",
                  date="2023-02-01T00:00:00Z") for i, t in enumerate(originals[:11])]
    recs += [_rec("mirror-own", _text(rng), "CC-MAIN-2023-14", host="mirror.jp")]
    victim = _text(rng)
    recs += [_rec("mirror-newest", victim, "CC-MAIN-2023-14", host="mirror.jp", date="2023-03-30T00:00:00Z"),
             _rec("victim-1", victim, "CC-MAIN-2023-14", host="victim.jp", date="2023-03-01T00:00:00Z")]
    # stable.jp: the same 12 pages crawled twice; the older crawl is removed but the host is not a copier
    stable = [_text(rng) for _ in range(12)]
    recs += [_rec(f"stable-{s}-{i}", t, s, host="stable.jp") for s in SNAPS for i, t in enumerate(stable)]
    recs += [_rec("small-copy", originals[11], "CC-MAIN-2023-14", host="small.jp", date="2023-01-01T00:00:00Z")]
    write_jsonl(inp / "s.jsonl.zst", recs)
    out = tmp_path / "out"
    report = run_dedup(inp, out, SMALL, show_progress=False)
    shards, removed = read_output(out)
    assert report["hosts_dropped"] == 1 and removed["mirror-own"] == ("host_filter", None)
    assert removed["mirror-newest"] == ("near_duplicate", "victim-1") and "victim-1" in shards["s.jsonl.zst"]
    assert report["host_removed"] == 1 and report["dup_removed"] == 11 + 12 + 1 + 1
    assert (out / "_dedup" / "hosts_dropped.txt").read_text() == "mirror.jp\n"
    hosts = {h["host"]: h for h in read_jsonl(out / "_dedup" / "state" / "hosts.jsonl.zst")}
    assert hosts["stable.jp"]["dup_removed"] == 12 and not hosts["stable.jp"]["dropped"]
    m = hosts["mirror.jp"]
    assert (m["pages"], m["after_dedup"], m["after_host_filter"], m["dup_removed_other_host"]) == (13, 2, 0, 11)
    assert not hosts["small.jp"]["dropped"]  # 1 page < host_min_pages
    # counting every removal (the paper's literal rule) also drops the re-crawled stable host
    out_all = tmp_path / "out_all"
    report = run_dedup(inp, out_all, SMALL.model_copy(update={"host_count": "all", "host_threshold": 0.4}),
                       show_progress=False)
    assert (out_all / "_dedup" / "hosts_dropped.txt").read_text().split() == ["stable.jp", "mirror.jp"]
    off = run_dedup(inp, tmp_path / "off", SMALL.model_copy(update={"host_filter": False}), show_progress=False)
    assert off["host_removed"] == 0 and off["hosts_dropped"] == 0


def test_resume_and_parameter_guard(tmp_path):
    _, _, both = make_snapshots(tmp_path, seed=4)
    out = tmp_path / "out"
    run_dedup(both, out, SMALL, show_progress=False)
    before = read_output(out)
    state = out / "_dedup" / "state"
    # simulate a run killed during apply: one marker and its output are gone
    (state / "done" / "apply-CC-MAIN-2023-23-00001.jsonl.zst.json").unlink()
    (out / "CC-MAIN-2023-23-00001.jsonl.zst").unlink()
    mtime = (state / "sig" / "CC-MAIN-2023-14-00000.jsonl.zst.bands.npy").stat().st_mtime_ns
    run_dedup(both, out, SMALL, show_progress=False)
    assert read_output(out) == before
    assert (state / "sig" / "CC-MAIN-2023-14-00000.jsonl.zst.bands.npy").stat().st_mtime_ns == mtime
    with pytest.raises(HibariError, match="different run .*config bands: 9 -> 40.*--overwrite"):
        run_dedup(both, out, DedupConfig(plot=False), show_progress=False)


def test_invalid_records_pass_through_counted(tmp_path):
    rng = np.random.default_rng(5)
    t = _text(rng)
    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "a.jsonl.zst", [_rec("a", t, "CC-MAIN-2023-14"), {"id": "no-text", "host": "x.jp"},
                                      {"text": t}, _rec("b", t, "CC-MAIN-2023-23")])
    report = run_dedup(inp, tmp_path / "out", SMALL, show_progress=False)
    shards, removed = read_output(tmp_path / "out")
    assert report["invalid_passed_through"] == 2 and report["docs_out"] == 3
    assert shards["a.jsonl.zst"] == ["no-text", None, "b"] and removed == {"a": ("near_duplicate", "b")}


def test_multiprocess_workers_same_result(tmp_path):
    _, _, both = make_snapshots(tmp_path, seed=6)
    run_dedup(both, tmp_path / "one", SMALL, show_progress=False)
    run_dedup(both, tmp_path / "two", SMALL, workers=2, show_progress=False)
    assert read_output(tmp_path / "one") == read_output(tmp_path / "two")


def test_cli_runs_and_reports(tmp_path, capsys):
    from launch.cli import main

    _, _, both = make_snapshots(tmp_path, seed=7)
    out = tmp_path / "out"
    rc = main(["corpus", "dedup", "--input", str(both), "--output", str(out), "--bands", "10", "--rows", "5",
               "--quiet"])
    assert rc == 0
    assert "near-duplicates removed" in capsys.readouterr().out
    report = json.loads((out / "_dedup" / "report.json").read_text())
    assert report["params"]["bands"] == 10 and report["dup_removed"] == 13
    md = (out / "_dedup" / "report.md").read_text()
    assert "## Cluster sizes" in md and "| 3 | 1 |" in md
    assert (out / "_dedup" / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,msg", [
    (["--workers", "0"], "--workers: expected >= 1"),
    (["--rows", "0"], "--rows"),
    (["--previous", "/nonexistent-dedup-run"], "no finished dedup run"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, msg):
    from launch.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "a.jsonl.zst", [_rec("a", "テキスト", "CC-MAIN-2023-14")])
    rc = main(["corpus", "dedup", "--input", str(inp), "--output", str(tmp_path / "out"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1 and err.startswith("hibari: error:")


def test_bad_input_dirs(tmp_path):
    with pytest.raises(HibariError, match="no such file or directory"):
        run_dedup(tmp_path / "missing", tmp_path / "out", show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HibariError, match="directory without documents"):
        run_dedup(tmp_path / "empty", tmp_path / "out", show_progress=False)
    with pytest.raises(HibariError, match="must not be an input directory or inside one"):
        run_dedup(tmp_path / "empty", tmp_path / "empty" / "out", show_progress=False)


def test_histogram_bins_for_the_plot():
    from data_pipeline.dedup.report import _size_bins

    assert _size_bins({2: 5, 3: 1}) == (["2", "3"], [5, 1])
    labels, values = _size_bins({k: 1 for k in range(2, 40)})
    assert labels == ["2", "3-4", "5-8", "9-16", "17-32", "33-64"] and sum(values) == 38
