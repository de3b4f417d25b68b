"""Progress in a log file: plain lines with count, rate and ETA at the start, every tenth and the end."""

import io

from data_plane.progress import ProgressLines, track


def test_lines_every_tenth_with_rate_and_eta(capsys):
    assert list(track(range(40), description="score")) == list(range(40))  # pytest's stdout is not a TTY
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("score: 0/40 (0%)") and lines[-1].startswith("score: 40/40 (100%)")
    assert len(lines) == 11 and all("items/s" in line for line in lines)  # 0, 4, 8, …, 40: no repeat at the end
    assert "ETA" in lines[5] and "ETA" not in lines[-1]
    assert not list(track([], description="nothing", show=True))
    assert capsys.readouterr().out.count("nothing: 0") == 2
    list(track(range(5), show=False))
    assert capsys.readouterr().out == ""


def test_a_resumed_count_rates_only_this_processes_work():
    out = io.StringIO()
    lines = ProgressLines("train x step", 1000, "steps", stream=out, start=900)
    lines.started -= 10  # ten seconds ago
    lines.update(950, "loss=0.5", force=True)
    text = out.getvalue()
    assert text.startswith("train x step: 950/1000 (95%), 5 steps/s") and "ETA 0:00:10" in text and "loss=0.5" in text
