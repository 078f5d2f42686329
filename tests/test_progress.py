"""Rank 0's progress (`commsgd.progress`): plain lines on a schedule when not on a terminal, never a
carriage return there; on a terminal the tqdm bar shows the last test error."""

from __future__ import annotations

import io

from commsgd.progress import Progress, format_line, line_interval


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_names_step_loss_test_error_and_elapsed() -> None:
    line = format_line("allreduce", 60, 600, 0.41234, 0.1234, 13.21)
    assert line == "allreduce step 60/600 (10 %) loss 0.4123 test error 12.34 % elapsed 13.2 s"
    assert format_line("lsgd", 1, 600, 2.0, None, 0.0) == "lsgd step 1/600 (0 %) loss 2.0000 elapsed 0.0 s"


def test_interval_defaults_to_a_tenth_of_the_run() -> None:
    assert line_interval(600, 0) == 60
    assert line_interval(7, 0) == 1
    assert line_interval(600, 25) == 25


def test_lines_every_tenth_of_the_steps_or_every_interval_s_and_no_carriage_return() -> None:
    bar, lines, clock = io.StringIO(), io.StringIO(), Clock()
    progress = Progress(100, 0, "lsgd", every_s=30.0, bar_stream=bar, line_stream=lines, clock=clock)
    for step in range(1, 101):
        clock.now += 0.1  # 10 s per 100 steps: the step schedule decides
        if step == 35:
            progress.test_error(0.25)
        progress.update(step, 1.0 / step)
    progress.close()
    text = lines.getvalue()
    assert "\r" not in text and bar.getvalue() == ""
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in text.splitlines()]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert "test error" not in text.splitlines()[2] and "test error 25.00 %" in text.splitlines()[3]


def test_a_slow_run_gets_a_line_every_interval_s() -> None:
    lines, clock = io.StringIO(), Clock()
    progress = Progress(
        1000, 0, "easgd", every_s=30.0, bar_stream=io.StringIO(), line_stream=lines, clock=clock
    )
    for step in range(1, 21):
        clock.now += 7.0  # 7 s a step: a line every 5 steps (35 s), long before 100 steps
        progress.update(step, 0.5)
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in lines.getvalue().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_a_terminal_gets_the_bar_with_the_last_test_error() -> None:
    terminal, lines = Terminal(), io.StringIO()
    progress = Progress(20, 0, "allreduce", bar_stream=terminal, line_stream=lines)
    for step in range(1, 21):
        progress.update(step, 0.5)
        if step == 10:
            progress.test_error(0.125)
    progress.close()
    assert lines.getvalue() == ""
    assert "\r" in terminal.getvalue() and "test error=12.50%" in terminal.getvalue()
