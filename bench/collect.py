"""Assemble BENCHMARKS.md from the per-area result files in bench/results/ (each written by its benchmark).

    python -m bench.collect
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["convert", "train_cpu", "parallel", "precision", "corpus", "dedup", "tokenize", "demo", "gpu"]

HEADER = """# hibari benchmarks

Speed and memory goals live here, not in unit tests. Every number is a ratio against a named baseline measured in
the same run, on the machine and date given in each section. Each benchmark writes its own section to
`bench/results/<area>.md`; `python -m bench.collect` assembles this file.
"""


def main() -> None:
    files = {p.stem: p for p in sorted((ROOT / "bench" / "results").glob("*.md"))}
    names = [n for n in ORDER if n in files] + sorted(n for n in files if n not in ORDER)
    parts = [HEADER]
    for n in names:
        parts.append(files[n].read_text(encoding="utf-8").strip() + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts), encoding="utf-8")
    print(f"BENCHMARKS.md: {len(names)} sections ({', '.join(names)})")


if __name__ == "__main__":
    main()
