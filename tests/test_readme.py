"""Executable docs: the README's Python example runs as written, and every figure of its headline table is backed by
the rows of benchmarks/RESULTS.md it links to (their anchors exist, and each number of the README's cell is in those
rows of benchmarks/results/history.csv)."""
import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
LINK = re.compile(r"\]\(benchmarks/RESULTS\.md#([\w-]+)\)")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")  # 2.39, 1k -> 1, but not the 16 of fp16


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out" / "llama-tiny" / "model.safetensors").exists()


def test_readme_figures_are_in_the_rows_they_link_to():
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', (ROOT / "benchmarks" / "RESULTS.md").read_text()))
    links = LINK.findall(README)
    assert links, "the README links to no row of benchmarks/RESULTS.md"
    missing = [a for a in links if a not in anchors]
    assert not missing, f"README links to anchors that benchmarks/RESULTS.md lacks: {missing}"

    with open(ROOT / "benchmarks" / "results" / "history.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    checked = 0
    for line in README.splitlines():
        cited = [a for a in LINK.findall(line) if a in rows]
        if not (line.startswith("|") and cited):
            continue
        result = line.split(" | ")[1].replace("**", "")  # | what | result | machine | evidence |
        evidence = set(NUMBER.findall(" ".join(v for a in cited for v in rows[a].values())))
        unbacked = [n for n in NUMBER.findall(result) if n not in evidence]
        assert not unbacked, f"README figures {unbacked} are not in rows {cited}: {result!r}"
        checked += 1
    assert checked >= 6, f"only {checked} headline rows link to a history row"
