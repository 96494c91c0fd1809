"""Progress bars in a log file: no cursor-movement junk from nested bars (pytest's captured stderr is not a
terminal, like a redirected log)."""

from __future__ import annotations

import sys

from unetseg.progress import progress_bar


def test_off_a_terminal_a_nested_bar_is_not_drawn_and_writes_no_cursor_codes(capsys):
    assert not sys.stderr.isatty()
    with progress_bar(enabled=True, total=2, desc="runs") as outer:
        for _ in range(2):
            inner = progress_bar(range(3), desc="epoch", leave=False)
            assert inner.disable and not outer.disable
            list(inner)
            outer.update(1)
            outer.write("run finished")
    err = capsys.readouterr().err
    assert "\x1b[A" not in err and "epoch" not in err and "runs" in err
    assert progress_bar(range(2), enabled=False).disable  # --quiet stays quiet


def test_a_training_run_inside_a_study_s_bar_leaves_no_cursor_codes_in_the_log(capsys, tmp_path, data_root):
    """What ``unetseg ablate`` does with --jobs 1: each run's loading and epoch bars open inside the runs bar."""
    from unetseg.train import fit

    from .conftest import tiny_config

    with progress_bar(enabled=True, total=1, desc="runs") as runs:
        fit(tiny_config(["train.epochs=2", "train.val_every=1"]), tmp_path / "run", data_root=data_root, progress=True)
        runs.update(1)
    err = capsys.readouterr().err
    assert "\x1b[A" not in err and "runs" in err
