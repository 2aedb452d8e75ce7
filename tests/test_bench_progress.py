"""The benchmark engine's progress display (python -m fusedloss.bench): a tqdm bar with case
k of n, the time elapsed and the estimate of the time left on a terminal, nothing when stderr
is not a terminal (CI logs), the per-case log lines either way."""
import io
import sys

import pytest

pytest.importorskip("tqdm")
from fusedloss.bench.__main__ import _log_writer, progress  # noqa: E402


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_three_cases(monkeypatch, stream):
    monkeypatch.setattr(sys, "stderr", stream)
    bar, log = progress(3, "case"), _log_writer()
    for k in range(3):
        log(f"[{k + 1}/3] family: case {k}")
        bar.set_description(f"case {k}")
        bar.update()
    bar.close()
    return stream.getvalue()


def test_progress_on_a_terminal(monkeypatch):
    text = run_three_cases(monkeypatch, Terminal())
    assert "[3/3] family: case 2" in text
    assert "case 2: 100%" in text and "3/3 [" in text  # k of n, then [elapsed<left, rate]
    assert "<00:00" in text


def test_progress_silent_off_a_terminal(monkeypatch):
    text = run_three_cases(monkeypatch, io.StringIO())
    assert text.splitlines() == [f"[{k + 1}/3] family: case {k}" for k in range(3)]
