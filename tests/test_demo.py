"""`hibari demo`: the embedded demo data (deterministic, of the intended variety) and the end-to-end run.

The end-to-end test runs `hibari demo --quick` in a temp dir (every real command: corpus clean/dedup, tokenizer
train/expand, convert expand-vocab/hf-to-hibari/hibari-to-hf, data tokenize, launch local with 4 processes) and
checks every artifact. It needs no shared data and no network.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "launch" / "demo_data"
GENERATED = ["manifest.json", "english.jsonl.zst", *sorted(str(p.relative_to(DEMO_DATA))
                                                         for p in DEMO_DATA.glob("warc/*/*.warc.gz"))]


def _manifest() -> dict:
    return json.loads((DEMO_DATA / "manifest.json").read_text(encoding="utf-8"))


def _article_text(html: str) -> str:
    """The <p> paragraphs of the page's <article> (what an extractor should keep), one per line."""
    m = re.search(r"<article>(.*?)</article>", html, re.S)
    paras = re.findall(r"<p>(.*?)</p>", m.group(1), re.S) if m else []
    return "\n".join(p.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") for p in paras)


def _read_responses(path: Path):
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with open(path, "rb") as f:
        for rec in ArchiveIterator(f, record_types=WarcRecordType.response, parse_http=True):
            yield rec.record_id, rec.http_headers.status_code, rec.http_content_type, rec.reader.read()


# ----------------------------------------------------------------------------------------------------------------
def test_demo_data_is_committed_and_deterministic(tmp_path):
    """Regenerating with the committed script reproduces the committed files byte for byte."""
    assert len(GENERATED) == 2 + 4, GENERATED
    proc = subprocess.run([sys.executable, str(DEMO_DATA / "make_demo_data.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for rel in GENERATED:
        assert (tmp_path / rel).read_bytes() == (DEMO_DATA / rel).read_bytes(), f"{rel} differs from a fresh run"
    total = sum((DEMO_DATA / rel).stat().st_size for rel in GENERATED)
    assert total < 3_000_000, f"demo data is {total} bytes: keep it to a few MB"


def test_demo_data_variety_and_manifest():
    manifest = _manifest()
    kinds = manifest["kinds"]
    for kind in ("good", "url_variant", "recrawl_same", "recrawl_edited", "mirror_copy", "mirror_own",
                 "boilerplate", "spam", "teaser", "katakana", "english", "blocked", "not_html", "http_404"):
        assert kinds.get(kind, 0) > 0, f"no {kind} pages"
    snapshots = {r["snapshot"] for r in manifest["records"]}
    assert snapshots == {"CC-MAIN-2024-10", "CC-MAIN-2024-18"}
    charsets = collections.Counter(r["charset"] for r in manifest["records"] if r["kind"] == "good")
    assert charsets["shift_jis"] > 0 and charsets["euc-jp"] > 0
    e = manifest["expected"]
    assert e["clean_kept"] == sum(r["clean"] == "keep" for r in manifest["records"])
    assert e["final_docs"] == e["clean_kept"] - e["dedup_removed"] - e["host_removed"]
    assert e["dedup_removed"] > 0 and e["host_removed"] > 0
    # near-duplicates really cross the two snapshots
    fam_snaps = collections.defaultdict(set)
    for r in manifest["records"]:
        if r["family"] is not None and r["clean"] == "keep":
            fam_snaps[r["family"]].add(r["snapshot"])
    assert sum(len(s) == 2 for s in fam_snaps.values()) >= 20


def test_demo_warcs_parse_and_pages_meet_their_intended_rules():
    """Every manifest record is in the WARCs; good articles pass every Swallow quality rule; low-quality kinds fail."""
    from data_pipeline.filters import quality_decision, quality_features

    by_id = {r["record_id"]: r for r in _manifest()["records"]}
    seen = set()
    decisions = collections.defaultdict(list)
    for warc in sorted(DEMO_DATA.glob("warc/*/*.warc.gz")):
        for rid, status, ctype, payload in _read_responses(warc):
            rec = by_id[rid]
            seen.add(rid)
            if rec["kind"] == "not_html":
                assert not ctype.startswith("text/html")
                continue
            if rec["kind"] == "http_404":
                assert status == 404
                continue
            assert status == 200 and ctype == "text/html"
            encoding = {"shift_jis": "cp932", "euc-jp": "euc_jp"}.get(rec["charset"], "utf-8")
            text = _article_text(payload.decode(encoding))
            keep, reasons = quality_decision(quality_features(text))
            decisions[rec["kind"]].append((keep, reasons, rec["uri"]))
    assert seen == set(by_id), "manifest and WARC files disagree"
    for kind in ("good", "url_variant", "recrawl_same", "recrawl_edited", "mirror_copy", "mirror_own", "blocked"):
        bad = [(u, r) for k, r, u in decisions[kind] if not k]
        assert not bad, f"{kind} pages failing the quality rules: {bad[:3]}"
    for kind in ("spam", "teaser", "katakana", "boilerplate"):
        kept = [u for k, _, u in decisions[kind] if k]
        assert not kept, f"{kind} pages passing the quality rules: {kept[:3]}"
    assert any("ellipsis_fraction>0.2" in r for _, r, _ in decisions["teaser"])
    assert any("katakana_fraction>0.5" in r for _, r, _ in decisions["katakana"])


def test_english_corpus():
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress((DEMO_DATA / "english.jsonl.zst").read_bytes(),
                                                  max_output_size=10_000_000).decode("utf-8")
    docs = [json.loads(line) for line in raw.splitlines() if line.strip()]
    assert len(docs) == _manifest()["expected"]["english_docs"]
    assert 100_000 < len(raw) < 500_000
    assert all(d["text"].isascii() for d in docs)


# ----------------------------------------------------------------------------------------------------------------
def test_missing_command_stops_with_one_line(tmp_path):
    from launch.demo import prepare_workdir
    from launch.demo_steps import Demo, Step
    from hibari.errors import HibariError

    prepare_workdir(tmp_path / "w")
    demo = Demo(tmp_path / "w", steps=4, quick=True, layout="dp2tp2", nproc=4, preempt=True, workers=1)
    demo.commands = {k: v for k, v in demo.commands.items() if k != ("convert", "expand-vocab")}
    demo.current = Step(3, "tokenizer", "t")
    with pytest.raises(HibariError) as err:
        demo.step_tokenizer()
    assert str(err.value) == "step 3 (tokenizer) unavailable: `hibari convert expand-vocab` is not installed yet"


def test_workdir_not_made_by_demo_is_never_wiped(tmp_path):
    from launch.demo import prepare_workdir
    from hibari.errors import HibariError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(HibariError, match="not made by `hibari demo`"):
        prepare_workdir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo") / "work"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "demo", "--quick", "--workdir", str(work)],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=1500)
    summary_path = work / "demo_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return {"proc": proc, "work": work, "summary": summary}


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quick_demo_runs_every_step(quick_demo):
    proc = quick_demo["proc"]
    tail = (proc.stdout[-3000:] + "\n---stderr---\n" + proc.stderr[-3000:])
    assert proc.returncode == 0, f"hibari demo --quick failed:\n{tail}"
    steps = quick_demo["summary"]["steps"]
    assert [s["name"] for s in steps] == ["corpus", "base", "tokenizer", "data", "train", "export", "report"]
    assert all(s["status"] == "ok" for s in steps)
    for n in range(1, 8):
        assert f"=== [{n}/7]" in proc.stdout and f"--- step {n} " in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quick_demo_corpus_artifacts(quick_demo):
    import zstandard

    work, s = quick_demo["work"], quick_demo["summary"]
    assert "corpus" in s, "the corpus step did not finish"
    expected = _manifest()["expected"]
    c = s["corpus"]
    assert c["pages_in"] == expected["records"]
    assert c["clean_kept"] == expected["clean_kept"]
    assert c["dedup_removed"] == expected["dedup_removed"]
    assert c["host_removed"] == expected["host_removed"]
    assert c["final_docs"] == expected["final_docs"]
    kept = 0
    for shard in sorted((work / "corpus" / "dedup").glob("*.jsonl.zst")):
        raw = zstandard.ZstdDecompressor().decompress(shard.read_bytes(), max_output_size=50_000_000)
        docs = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        kept += len(docs)
        assert all(expected["mirror_host"] not in d["url"] for d in docs)
        assert all(not any(h in d["url"] for h in expected["blocked_hosts"]) for d in docs)
    assert kept == expected["final_docs"]


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quick_demo_tokenizer_and_data(quick_demo):
    import sentencepiece as spm

    work, s = quick_demo["work"], quick_demo["summary"]
    assert "tokenizer" in s and "data" in s, "the tokenizer/data steps did not finish"
    t = s["tokenizer"]
    base = spm.SentencePieceProcessor(model_file=str(work / "base" / "tokenizer" / "tokenizer.model"))
    expanded = spm.SentencePieceProcessor(model_file=str(work / "tokenizer" / "expanded" / "tokenizer.model"))
    assert base.get_piece_size() == t["base_vocab"] == 1000
    assert expanded.get_piece_size() == t["expanded_vocab"] > t["base_vocab"] + 500
    for i in range(0, base.get_piece_size(), 37):  # original ids unchanged
        assert expanded.id_to_piece(i) == base.id_to_piece(i)
    hf_cfg = json.loads((work / "model" / "expanded_hf" / "config.json").read_text())
    assert hf_cfg["vocab_size"] == t["model_vocab"] >= t["expanded_vocab"] and hf_cfg["vocab_size"] % 8 == 0
    assert t["chars_per_token_after"] > 2 * t["chars_per_token_before"]
    for name in ("ja", "en"):
        assert (work / "data" / f"{name}.bin").stat().st_size > 0 and (work / "data" / f"{name}.idx").is_file()
    assert s["data"]["ja"]["documents"] == _manifest()["expected"]["final_docs"]


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quick_demo_training_loss_decreases_and_resumes(quick_demo):
    work, s = quick_demo["work"], quick_demo["summary"]
    assert "train" in s, "the training step did not finish"
    tr = s["train"]
    losses = tr["losses"]
    assert tr["steps"] == s["train_steps"] == len(losses)
    third = max(1, len(losses) // 3)
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third - 0.2, losses
    assert losses[-1] < losses[0]
    assert 1 <= tr["preempted_at"] < tr["steps"], "the run was not preempted at mid-run"
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [m["step"] for m in metrics] == list(range(1, tr["steps"] + 1)), "resume lost or repeated steps"
    assert {m["precision"] for m in metrics} == {"nvfp4"}
    assert (work / "run" / "checkpoints" / f"step_{tr['steps']:08d}" / "hibari_model.json").is_file()
    lrs = tr["lr"]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[0] < lrs[peak] > lrs[-1], "expected warmup then cosine decay"


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quick_demo_export_loads_and_generates(quick_demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work, s = quick_demo["work"], quick_demo["summary"]
    assert "export" in s, "the export step did not finish"
    hf = work / "export" / "hf"
    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    assert model.config.vocab_size == s["tokenizer"]["model_vocab"]
    ids = tok("旅行の計画を立てるときは、", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    gens = s["export"]["generations"]
    assert len(gens) == 3 and all(g["after"].strip() for g in gens)
    assert "generate" in quick_demo["proc"].stdout or "continuations" in quick_demo["proc"].stdout


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_quick_demo_report(quick_demo):
    work = quick_demo["work"]
    assert (work / "report.md").is_file(), "the report step did not finish"
    report = (work / "report.md").read_text(encoding="utf-8")
    for png in ("funnel.png", "dedup_clusters.png", "chars_per_token.png", "loss.png", "tokens_per_s.png"):
        path = work / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png})" in report
    expected = _manifest()["expected"]
    assert f"{expected['final_docs']} documents" in report
