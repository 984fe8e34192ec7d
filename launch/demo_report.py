"""`hibari demo` step 7: WORKDIR/report.md and its charts, from the results the other steps collected."""

from __future__ import annotations

import os
from pathlib import Path

def write_report(workdir: Path, results: dict, step_log: list) -> list[Path]:
    """WORKDIR/report.md plus charts: funnel, dedup clusters, chars/token, loss curve, tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hibari.progress import progress_bar

    files: list[Path] = []
    c, tk, tr = results["corpus"], results["tokenizer"], results["train"]

    def save(fig, name):
        path = workdir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    with progress_bar(total=5, desc="report charts", unit="chart") as bar:
        # 1. funnel: pages after every clean stage, then dedup and the host filter
        names = [s["name"] for s in c["clean_stages"]] + ["dedup", "host filter"]
        counts = [s["pages_out"] for s in c["clean_stages"]] + [c["clean_kept"] - c["dedup_removed"],
                                                                c["final_docs"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.barh(names[::-1], counts[::-1], color="#4a7ab5")
        for y, v in enumerate(counts[::-1]):
            ax.text(v, y, f" {v}", va="center", fontsize=8)
        ax.set_xlabel("pages remaining")
        ax.set_title(f"corpus funnel: {c['pages_in']} WARC records -> {c['final_docs']} documents")
        save(fig, "funnel.png")
        bar.advance(1)
        # 2. dedup cluster sizes
        hist = {int(k): v for k, v in c["cluster_size_histogram"].items()}
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar([str(k) for k in sorted(hist)], [hist[k] for k in sorted(hist)], color="#b5654a")
        ax.set_xlabel("near-duplicate cluster size (documents)")
        ax.set_ylabel("clusters")
        ax.set_title(f"MinHash-LSH clusters ({c['dedup_removed']} documents removed)")
        save(fig, "dedup_clusters.png")
        bar.advance(1)
        # 3. characters per token before/after the vocabulary expansion
        fig, ax = plt.subplots(figsize=(5, 3.5))
        vals = [tk["chars_per_token_before"], tk["chars_per_token_after"]]
        ax.bar([f"base\n({tk['base_vocab']} pieces)", f"expanded\n({tk['expanded_vocab']} pieces)"], vals,
               color=["#999999", "#4a9b5a"])
        for x, v in enumerate(vals):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom")
        ax.set_ylabel("characters per token (Japanese)")
        ax.set_title("tokenizer efficiency on Japanese")
        save(fig, "chars_per_token.png")
        bar.advance(1)
        # 4. loss curve (+ validation, the preemption point and the LR re-warm)
        steps = list(range(1, len(tr["losses"]) + 1))
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, tr["losses"], label="train loss", color="#4a7ab5")
        if tr["val_losses"]:
            vs = sorted((int(k), v) for k, v in tr["val_losses"].items())
            ax.plot([k for k, _ in vs], [v for _, v in vs], "o-", label="validation loss", color="#b5654a")
        if tr.get("preempted_at"):
            ax.axvline(tr["preempted_at"], ls="--", color="gray", label=f"preempted + resumed (step "
                                                                        f"{tr['preempted_at']})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(steps, tr["lr"], color="#aaaaaa", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate (warmup + cosine re-warm)")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title("continual pretraining (NVFP4, 4 processes)")
        save(fig, "loss.png")
        bar.advance(1)
        # 5. throughput
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(range(1, len(tr["tokens_per_s"]) + 1), tr["tokens_per_s"], color="#4a9b5a")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens/s (all ranks)")
        ax.set_title(f"training throughput (median {tr['median_tokens_per_s']:.0f} tokens/s)")
        save(fig, "tokens_per_s.png")
        bar.advance(1)

    lines = ["# hibari demo report", "",
             "Every number below comes from the artifacts the real `hibari` commands wrote under this directory; "
             "rerun any step with the command shown.", "",
             "## Steps", "", "| step | time (s) | result |", "|---|---:|---|"]
    for s in step_log:
        if s.name != "report":
            lines.append(f"| {s.n} {s.name} | {s.seconds:.1f} | {s.summary} |")
    lines += ["", f"Total: {results.get('total_seconds', sum(s.seconds for s in step_log)):.0f}s wall "
              f"(machine: {os.cpu_count()} CPU cores).", "", "Commands:", "", "```"]
    for s in step_log:
        lines += list(s.commands)
    lines += ["```", "", "## 1. Corpus: clean + dedup", "", "![funnel](funnel.png)", "",
              "| stage | pages in | pages out |", "|---|---:|---:|"]
    for st in c["clean_stages"]:
        lines.append(f"| {st['name']} | {st['pages_in']} | {st['pages_out']} |")
    lines += [f"| dedup (MinHash-LSH, keep newest) | {c['clean_kept']} | {c['clean_kept'] - c['dedup_removed']} |",
              f"| host filter | {c['clean_kept'] - c['dedup_removed']} | {c['final_docs']} |", "",
              "Drop reasons:", "", "| reason | pages |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(c["drop_reasons"].items(), key=lambda kv: -kv[1])]
    lines += ["", f"Documents per snapshot after dedup: {c['docs_out_per_snapshot']}", "",
              "![dedup clusters](dedup_clusters.png)", "",
              "## 2-3. Base model and vocabulary expansion", "",
              f"Base: tiny Llama, {results['base']['params'] / 1e6:.2f}M parameters, English BPE tokenizer of "
              f"{tk['base_vocab']} pieces. Japanese tokenizer: {tk['ja_vocab']} pieces; {tk['added_pieces']} new "
              f"pieces appended -> {tk['expanded_vocab']} (model embeddings padded to {tk['model_vocab']} rows, new "
              f"rows = mean of the base embeddings of their sub-tokens).", "",
              f"Characters per token on Japanese: **{tk['chars_per_token_before']:.2f} -> "
              f"{tk['chars_per_token_after']:.2f}**.", "", "![chars per token](chars_per_token.png)", "",
              "## 4. Training data", ""]
    for k, v in results["data"].items():
        lines.append(f"- `{k}`: {v['documents']} documents, {v['tokens']:,} tokens ({v['dtype']})")
    lines += ["", "## 5. Continual pretraining", "",
              f"{tr['steps']} steps, {results['nproc']} processes ({results['layout']}), recipe "
              f"{', '.join(tr['precision'])} (first/last block BF16), warmup + cosine re-warm. Loss "
              f"{tr['first_loss']:.3f} -> {tr['last_loss']:.3f}."
              + (f" Preempted (SIGUSR1) after step {tr['preempted_at']}, resumed from its checkpoint."
                 if tr.get("preempted_at") else ""),
              f"Checkpoints: {', '.join(tr['checkpoints'])}. Median throughput {tr['median_tokens_per_s']:.0f} "
              f"tokens/s.", "", "![loss](loss.png)", "", "![tokens/s](tokens_per_s.png)", "",
              "## 6. Export and generation", "",
              f"`hibari convert hibari-to-hf` of `{Path(results['export']['checkpoint']).name}`, loaded with "
              f"`transformers.AutoModelForCausalLM`; continuations (seeded top-k sampling):", "",
              "| prompt | before training | after training |", "|---|---|---|"]
    for g in results["export"]["generations"]:
        lines.append(f"| {g['prompt']} | {_md_cell(g['before'])} | {_md_cell(g['after'])} |")
    lines.append("")
    (workdir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return files


def _md_cell(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in text)  # an untrained model emits control bytes
    return text.replace("|", "\\|")
