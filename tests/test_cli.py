"""The ``eep`` command as a user meets it: help, one-line errors with exit 2, any rank count from 2,
faults that cannot reach their rank reported, nothing left behind in the temp directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def eep(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m eep.cli ARGS`` in ``tmp_path``, with ``TMPDIR`` there too (to see what is left)."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, "-m", "eep.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_command(tmp_path):
    got = eep("--help", tmp_path=tmp_path)
    assert got.returncode == 0, got.stderr
    for command in ("demo", "launch", "build-gemm"):
        line = next((line for line in got.stdout.splitlines() if line.strip().startswith(command)), "")
        assert len(line.split()) > 1, f"no one-line description of {command!r} in:\n{got.stdout}"


@pytest.mark.parametrize("command", ["demo", "launch", "build-gemm"])
def test_every_option_has_help_and_shows_its_default(command):
    from eep.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    text = sub.format_help()
    assert "`" not in text, "raw markup in the help text"
    for action in sub._actions:
        assert action.help, f"eep {command} {action.option_strings}: no help text"
        if action.default not in (None, False, []) and action.option_strings != ["-h", "--help"]:
            # (compared without whitespace: help lines wrap, at hyphens too)
            assert f"(default:{action.default})" in "".join(text.split()), f"{action.option_strings}: default not shown"


BAD_ARGUMENTS = [
    (["launch", "--ranks", "0"], "--ranks"),
    (["launch", "--ranks", "-2"], "--ranks"),
    (["launch", "--ranks", "many"], "--ranks"),
    (["launch", "--kill", "1"], "RANK@ANSWERS"),
    (["launch", "--ranks", "4", "--kill", "7@10"], "no rank 7"),
    (["launch", "--requests", "50", "--kill", "1@500"], "never fire"),
    (["launch", "--restart-after", "-1"], "--restart-after"),
    (["launch", "--cont-after", "1"], "--stop"),
    (["demo", "--kill-rank", "9"], "no rank 9"),
    (["demo", "--ranks", "1"], "--ranks"),
    (["demo", "--skip-reference", "--reference-only"], "not allowed"),
    (["fly"], "invalid choice"),
    ([], "command is required"),
]


def _check_one_line_error(code: int, stderr: str, args: list[str], culprit: str) -> None:
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("eep: error: ") and culprit in last, stderr
    if args:  # (no command at all also prints the help first)
        assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("args,culprit", BAD_ARGUMENTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_end_in_one_line(capsys, args, culprit):
    from eep.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    assert captured.out == ""
    _check_one_line_error(exit_info.value.code, captured.err, args, culprit)


@pytest.mark.parametrize("args,culprit", [BAD_ARGUMENTS[1], BAD_ARGUMENTS[4], BAD_ARGUMENTS[8]],
                         ids=["ranks -2", "kill 7@10", "demo kill-rank 9"])
def test_bad_arguments_from_the_shell(tmp_path, args, culprit):
    got = eep(*args, tmp_path=tmp_path, timeout=60)
    assert "Traceback" not in got.stdout
    _check_one_line_error(got.returncode, got.stderr, args, culprit)


def test_launch_two_ranks_survives_a_kill_and_cleans_up(tmp_path):
    got = eep("launch", "--ranks", "2", "--requests", "80", "--kill", "1@25", "--restart-after", "0.2",
              "--heartbeat-ms", "50", "--suspect-misses", "20", "--timeout", "90", tmp_path=tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    report = json.loads(got.stdout)
    assert report["problems"] == [] and report["answered"] == report["requests"] == 80
    assert report["faults"] == [{"action": "kill", "rank": 1, "at_answers": 25, "fired": True}]
    assert report["summary"]["faults"][0]["epoch"] == 1, report["summary"]  # repaired: the survivor served alone
    assert report["run_dir"] is None
    assert not list(tmp_path.glob("eep-*")), "the run directory was left behind without --keep"


def test_a_fault_that_cannot_reach_its_rank_is_a_problem(tmp_path):
    # no restart: the second SIGKILL finds rank 1 already gone
    got = eep("launch", "--ranks", "2", "--requests", "60", "--kill", "1@10", "--kill", "1@20",
              "--heartbeat-ms", "50", "--suspect-misses", "20", "--timeout", "90", "--keep", tmp_path=tmp_path)
    assert got.returncode == 1, got.stdout + got.stderr
    report = json.loads(got.stdout)
    assert any("kill rank 1 at 20 answers was not sent" in p for p in report["problems"]), report["problems"]
    assert report["answered"] == 60  # the survivor answered everything
    assert report["run_dir"] and Path(report["run_dir"]).is_dir()  # --keep


def test_reference_demo_honours_ranks(tmp_path):
    got = eep("demo", "--reference-only", "--ranks", "2", tmp_path=tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "2 simulated EP ranks" in got.stdout
    assert "rank 2 " not in got.stdout and "rank 1 [DEAD" in got.stdout


def test_demo_on_two_rank_processes_writes_its_summary_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    got = eep("demo", "--skip-reference", "--ranks", "2", "--requests", "150", "--restart-after", "0.2",
              "--out", "demo-out", tmp_path=tmp_path, timeout=180)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "RESULT: survived SIGKILL of rank 1" in got.stdout
    out = tmp_path / "demo-out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == summary["requests"] == 150 and summary["problems"] == []
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not (out / "run").exists() and not list(tmp_path.glob("eep-*"))
