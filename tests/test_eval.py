"""`hibari eval`: a trained hibari checkpoint scored through HibariLM gives the numbers lm-eval's own HF backend gives
on the checkpoint's HF export (the oracle: transformers' model behind `lm_eval --model hf`), on the project's
Japanese task; results land in RUN/eval/ and metrics.jsonl; local task folders and bad input."""

import json

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")

from launch.cli import main  # noqa: E402
from megatron_ext.eval.harness import PACKAGED_TASKS  # noqa: E402
from megatron_ext.train.metrics import read_metrics  # noqa: E402
from tokenizer_utils import make_base_tokenizer  # noqa: E402
from train_helpers import TINY_MODEL, tiny_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = "hibari_ja_mc"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run (checkpoints at 3 and 6), its tokenizer, and the HF export of step 6."""
    from checkpoints.convert import hibari_to_hf
    from megatron_ext.train.loop import train

    root = tmp_path_factory.mktemp("eval")
    tok = make_base_tokenizer(root / "tok", vocab_size=420)
    run = root / "run"
    train(tiny_cfg(run, model={**TINY_MODEL, "vocab_size": 448, "max_seq_len": 128}))
    step = run / "checkpoints" / "step_00000006"
    export = root / "export"
    hibari_to_hf(step, export, tokenizer=tok)
    return {"root": root, "tok": tok, "run": run, "step": step, "export": export}


def _oracle(export, tasks=(TASK,), include=(PACKAGED_TASKS,), limit=None):
    """lm-eval's own HF backend, in-process, on the export (batch size 1: no padding at all)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export), "dtype": "float32",
                                                          "device": "cpu"},
                                  tasks=list(tasks), batch_size=1, limit=limit, bootstrap_iters=0, log_samples=True,
                                  task_manager=TaskManager(include_path=[str(p) for p in include],
                                                           include_defaults=False))
    return out



def test_hibari_checkpoint_matches_lm_eval_hf_backend(trained, tmp_path, capsys):
    out_file = tmp_path / "results.json"
    rc = main(["eval", "--ckpt", str(trained["step"]), "--tokenizer", str(trained["tok"]), "--tasks", TASK,
               "--out", str(out_file), "--log-samples"])
    assert rc == 0
    ours = json.loads(out_file.read_text())
    oracle = _oracle(trained["export"])

    mine, theirs = ours["results"][TASK], oracle["results"][TASK]
    assert ours["n-samples"][TASK]["effective"] == 24
    for metric in ("acc,none", "acc_norm,none"):
        assert mine[metric] == theirs[metric], metric  # exactly: the same choices win
    # every choice's log-likelihood agrees (two implementations of the model in fp32; batched vs unbatched)
    ref = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in oracle["samples"][TASK]}
    got = {s["doc_id"]: [r[0] for r in s["resps"]] for s in ours["samples"][TASK]}
    assert sorted(got) == sorted(ref) == list(range(24))
    for doc_id, lls in ref.items():
        assert got[doc_id] == pytest.approx(lls, abs=1e-4, rel=1e-5), doc_id
    # the scores mean something: the choices of one question differ by far more than the tolerance
    assert max(max(v) - min(v) for v in ref.values()) > 0.1

    # a run's checkpoint: RUN/eval/step_00000006.json and an "eval" event in metrics.jsonl
    saved = json.loads((trained["run"] / "eval" / "step_00000006.json").read_text())
    assert saved["step"] == 6 and saved["results"][TASK]["acc,none"] == theirs["acc,none"]
    events = [e for e in read_metrics(trained["run"], events=True) if e.get("event") == "eval"]
    assert events[-1]["step"] == 6
    assert events[-1][f"eval/{TASK}/acc"] == theirs["acc,none"]
    assert events[-1][f"eval/{TASK}/acc_norm"] == theirs["acc_norm,none"]
    assert [r["step"] for r in read_metrics(trained["run"])] == list(range(1, 7))  # step records untouched
    assert f"{TASK}  acc" in capsys.readouterr().out


def test_run_dir_resolves_newest_step_and_hf_path_matches(trained, tmp_path):
    """`--ckpt RUN` evaluates the newest complete step; `--hf EXPORT` gives the HF backend's numbers, here with
    one few-shot example (the same one drawn on both sides)."""
    out_ckpt, out_hf = tmp_path / "ckpt.json", tmp_path / "hf.json"
    common = ["--tasks", TASK, "--limit", "8", "--num-fewshot", "1", "--log-samples"]
    assert main(["eval", "--ckpt", str(trained["run"]), "--tokenizer", str(trained["tok"]), *common,
                 "--out", str(out_ckpt)]) == 0
    assert json.loads(out_ckpt.read_text())["ckpt"] == str(trained["step"])
    assert main(["eval", "--hf", str(trained["export"]), "--batch-size", "1", *common, "--out", str(out_hf)]) == 0
    a, b = json.loads(out_ckpt.read_text()), json.loads(out_hf.read_text())
    assert a["n-shot"][TASK] == b["n-shot"][TASK] == 1
    for metric in ("acc,none", "acc_norm,none"):
        assert a["results"][TASK][metric] == b["results"][TASK][metric]
    assert a["n-samples"][TASK]["effective"] == 8
    for x, y in zip(a["samples"][TASK], b["samples"][TASK]):
        assert [r[0] for r in x["resps"]] == pytest.approx([r[0] for r in y["resps"]], abs=1e-4)


def test_user_task_folder_with_json_data(trained, tmp_path):
    """A task a user keeps on disk, in JGLUE's JCommonsenseQA layout (the README's YAML): `dataset_path: json`."""
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    rows = [{"q_id": 0, "question": "日本の首都は", "choice0": "東京", "choice1": "大阪", "choice2": "京都",
             "choice3": "札幌", "choice4": "福岡", "label": 0},
            {"q_id": 1, "question": "一週間は何日", "choice0": "五日", "choice1": "七日", "choice2": "十日",
             "choice3": "三日", "choice4": "八日", "label": 1},
            {"q_id": 2, "question": "水が凍る温度は", "choice0": "百度", "choice1": "五十度", "choice2": "零度",
             "choice3": "十度", "choice4": "二十度", "label": 2}]
    data = folder / "valid-v1.1.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (folder / "jcsqa.yaml").write_text(
        "task: jcommonsenseqa_local\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{validation: {data}}}, cache_dir: {tmp_path / 'hf-cache'}}}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        "doc_to_text: \"質問: {{question}}\\n答え:\"\n"
        "doc_to_choice: \"{{[choice0, choice1, choice2, choice3, choice4]}}\"\n"
        "doc_to_target: label\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(trained["step"]), "--tokenizer", str(trained["tok"]), "--tasks",
                 "jcommonsenseqa_local", "--task-dir", str(folder), "--out", str(out), "--log-samples"]) == 0
    result = json.loads(out.read_text())
    oracle = _oracle(trained["export"], tasks=("jcommonsenseqa_local",), include=(folder,))
    for metric in ("acc,none", "acc_norm,none"):
        assert result["results"]["jcommonsenseqa_local"][metric] == \
            oracle["results"]["jcommonsenseqa_local"][metric]
    assert [len(s["resps"]) for s in result["samples"]["jcommonsenseqa_local"]] == [5, 5, 5]  # five choices


def test_generation_and_rolling_loglikelihood_match_hf_backend(trained, tmp_path):
    """The other two request types: greedy generation (exact strings) and rolling log-likelihood (perplexity over
    texts longer than the context, scored in windows)."""
    folder = tmp_path / "gen_tasks"
    folder.mkdir()
    qa = folder / "qa.jsonl"
    qa.write_text(PACKAGED_TASKS.joinpath("hibari_ja_mc", "hibari_ja_mc.jsonl").read_text(encoding="utf-8"),
                  encoding="utf-8")
    texts = folder / "texts.jsonl"
    body = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
    texts.write_text("".join(json.dumps({"text": body * n}, ensure_ascii=False) + "\n" for n in (1, 3, 6)),
                     encoding="utf-8")
    cache = tmp_path / "hf-cache"
    (folder / "gen.yaml").write_text(
        f"task: ja_gen_local\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {qa}}}, cache_dir: {cache}}}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: \"質問: {{question}}\\n答え:\"\n"
        "doc_to_target: \"{{choices[answer]}}\"\n"
        "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 6, do_sample: false}\n"
        "metric_list: [{metric: exact_match}]\n", encoding="utf-8")
    (folder / "ppl.yaml").write_text(
        f"task: ja_ppl_local\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {texts}}}, cache_dir: {cache}}}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list: [{metric: byte_perplexity}, {metric: bits_per_byte}]\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(trained["step"]), "--tokenizer", str(trained["tok"]), "--tasks",
                 "ja_gen_local,ja_ppl_local", "--task-dir", str(folder), "--limit", "4", "--log-samples",
                 "--out", str(out)]) == 0
    ours = json.loads(out.read_text())
    oracle = _oracle(trained["export"], tasks=("ja_gen_local", "ja_ppl_local"), include=(folder,), limit=4)
    got = {s["doc_id"]: s["resps"] for s in ours["samples"]["ja_gen_local"]}
    ref = {s["doc_id"]: s["filtered_resps"] for s in oracle["samples"]["ja_gen_local"]}
    assert got == ref and len(got) == 4
    assert any(r[0] for r in got.values())  # something was generated
    for metric in ("byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["ja_ppl_local"][metric] == pytest.approx(
            oracle["results"]["ja_ppl_local"][metric], rel=1e-5)


def test_bad_input_is_one_line(trained, tmp_path, capsys, monkeypatch):
    def run(*argv):
        rc = main(["eval", *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("hibari: error:") and "\n" not in err, err
        return err

    ckpt, tok = str(trained["step"]), str(trained["tok"])
    assert "no tokenizer files" in run("--ckpt", ckpt, "--tasks", TASK)
    assert "unknown task 'no_such_task_xyz'" in run("--ckpt", ckpt, "--tokenizer", tok, "--tasks",
                                                    "hibari_ja_mc,no_such_task_xyz")
    assert "not a directory" in run("--ckpt", ckpt, "--tokenizer", tok, "--tasks", TASK, "--task-dir",
                                    str(tmp_path / "missing"))
    assert "no hibari checkpoint here" in run("--ckpt", str(tmp_path), "--tokenizer", tok, "--tasks", TASK)
    assert "config.json not found" in run("--hf", str(tmp_path), "--tasks", TASK)
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if the extra were not installed
    assert "pip install 'hibari[eval]'" in run("--ckpt", ckpt, "--tokenizer", tok, "--tasks", TASK)


def test_periodic_eval_in_training_matches_cli(trained, tmp_path):
    """eval.tasks + eval.interval: rank 0 scores each checkpoint as `hibari eval --ckpt` scores it."""
    from megatron_ext.train.loop import train

    run = tmp_path / "run"
    train(tiny_cfg(run, model={**TINY_MODEL, "vocab_size": 448, "max_seq_len": 128}, train={"steps": 4},
                   checkpoint={"interval": 2},
                   eval={"tasks": [TASK], "interval": 2, "tokenizer": str(trained["tok"]), "limit": 12}))
    events = [e for e in read_metrics(run, events=True) if e.get("event") == "eval"]
    assert [e["step"] for e in events] == [2, 4]
    during = {s: json.loads((run / "eval" / f"step_{s:08d}.json").read_text()) for s in (2, 4)}
    assert during[2]["n-samples"][TASK]["effective"] == 12
    out = tmp_path / "cli.json"
    assert main(["eval", "--ckpt", str(run / "checkpoints" / "step_00000002"), "--tokenizer", str(trained["tok"]),
                 "--tasks", TASK, "--limit", "12", "--out", str(out)]) == 0
    cli = json.loads(out.read_text())["results"][TASK]
    for metric in ("acc,none", "acc_norm,none"):
        assert during[2]["results"][TASK][metric] == cli[metric]
        assert events[0][f"eval/{TASK}/{metric.split(',')[0]}"] == cli[metric]
