"""mfa.progress, what a user sees of the routing of console output through open bars: a
handler on ``sys.stdout`` and ``logging.lastResort`` (no logging configured) start their own
line under a bar too; a handler, ``warnings.showwarning`` or ``lastResort`` the user changed
while a bar was open keeps the user's value once the bars close; nested bars put everything
back in the right order; an error out of a fit finds the bar already put away; a trainer with
``progress=False`` draws nothing. Checked on what a terminal shows (``\\r`` returns to the
line's start, later text overwrites) and on the handlers' streams after the bars closed."""

import io
import logging
import sys
import warnings

import pytest
from helpers import BAR, random_data, random_model, screen

from mfa import progress
from mfa.em import EMConfig, EMTrainer

pytestmark = pytest.mark.usefixtures("one_thread")



def bar_fragments(lines: list[str]) -> list[str]:
    return [line for line in lines if any(part in line for part in BAR)]


@pytest.fixture(autouse=True)
def no_bar_left():
    """Close what a failing test left open, so that no routing leaks into later tests."""
    yield
    for bar in progress._live():
        bar.close()


@pytest.fixture
def logger():
    """A logger of its own (not propagating to pytest's handlers) and its handlers' cleanup."""
    log = logging.getLogger("mfa.test_progress_routing")
    before = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(before[0])
    log.propagate = before[1]


class Terminal:
    """One screen that ``sys.stdout`` and ``sys.stderr`` (two objects) both write to."""

    class Stream:
        def __init__(self, sink: list[str]) -> None:
            self.sink = sink

        def write(self, text: str) -> int:
            self.sink.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    def __init__(self) -> None:
        self.sink: list[str] = []
        self.stdout, self.stderr = self.Stream(self.sink), self.Stream(self.sink)

    def lines(self) -> list[str]:
        return screen("".join(self.sink))


def test_a_log_handler_on_stdout_starts_its_own_line_under_a_bar_on_stderr(
        monkeypatch, logger):
    """In a terminal stdout and stderr are one screen: a ``StreamHandler(sys.stdout)``
    (``logging.basicConfig(stream=sys.stdout)``) writing while the bar on stderr is shown
    was appended to the bar's line unless its stream was routed through the bar too."""
    tty = Terminal()
    monkeypatch.setattr(sys, "stdout", tty.stdout)
    monkeypatch.setattr(sys, "stderr", tty.stderr)
    handler = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)
    for i in progress.progress_bar(range(3), True, desc="EM run", leave=False):
        logger.info("step %d done", i)
    assert handler.stream is tty.stdout
    shown = tty.lines()
    assert [line for line in shown if "step" in line] == [f"step {i} done" for i in range(3)]
    assert not bar_fragments(shown), f"a bar left on screen: {shown}"


def test_a_warning_with_no_logging_configured_starts_its_own_line(capsys):
    """A program that configured no logging: a warning goes to ``logging.lastResort`` (on
    ``sys.stderr``, the bar's stream); it was appended to the bar's line unless written
    through the bar."""
    log = logging.getLogger("mfa.test_progress_routing.unconfigured")
    log.propagate = False  # (no handler on its way: lastResort, as with no logging set up)
    last_resort = logging.lastResort
    try:
        for i in progress.progress_bar(range(3), True, desc="EM run", leave=False):
            log.warning("step %d warned", i)
    finally:
        log.propagate = True
    assert logging.lastResort is last_resort
    shown = screen(capsys.readouterr().err)
    assert [line for line in shown if "step" in line] == [f"step {i} warned" for i in range(3)]
    assert not bar_fragments(shown), f"a bar left on screen: {shown}"


def test_what_the_user_changed_while_a_bar_was_open_is_kept(logger):
    """A handler given another stream, ``warnings.showwarning`` or ``logging.lastResort``
    replaced while a bar was open: closing the bar put mfa's saved values back over the
    user's (a handler moved to a log file wrote to the console again)."""
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    log_file = io.StringIO()

    def mine(message, category, filename, lineno, file=None, line=None):
        pass

    shown, last_resort = warnings.showwarning, logging.lastResort
    mine_last_resort = logging.StreamHandler(io.StringIO())
    try:
        bar = progress.progress_bar(range(3), True, desc="EM run", leave=False)
        assert handler.stream is not sys.stderr  # (routed through the bar)
        handler.setStream(log_file)
        warnings.showwarning = mine
        logging.lastResort = mine_last_resort
        bar.close()
        assert progress.open_bars() == 0
        assert handler.stream is log_file
        assert warnings.showwarning is mine
        assert logging.lastResort is mine_last_resort
        logger.info("after the bar")
        assert log_file.getvalue() == "after the bar\n"
    finally:
        warnings.showwarning, logging.lastResort = shown, last_resort


def test_nested_bars_put_the_console_back_newest_first(logger):
    """An inner bar drawn on the stream a log handler writes to (already routed through the
    outer bar) routes that stream again; undone oldest first, the outer step found the
    handler on the inner wrapper and left it, and the inner step put back the outer's
    wrapper: the handler stayed routed through bars after both were closed."""
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    outer = progress.progress_bar(range(3), True, desc="outer", leave=False)
    inner = progress.progress_bar(range(3), True, desc="inner", leave=False, file=handler.stream)
    assert progress.open_bars() == 2
    inner.close()
    outer.close()
    assert progress.open_bars() == 0
    assert handler.stream is sys.stderr


@pytest.mark.parametrize("where", ["in the loop", "as the bar is drawn"])
def test_an_error_out_of_a_fit_is_reported_after_the_bar_is_put_away(
        capsys, monkeypatch, logger, where):
    """An error or Ctrl-C out of a fit: while it is handled, the bar must already be gone and
    the console put back, or the error message printed is appended to the bar's line. Raised
    in the loop, tqdm closes the bar as the loop's iterator is dropped; raised as the bar was
    just drawn (Ctrl-C before the loop starts; the traceback keeps the bar alive) only the
    trainers' ``close_bars_opened_since`` closes it."""
    from mfa import training

    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    model = random_model(2, 5, 1, seed=0)
    x = random_data(200, model, seed=1)
    fitter = EMTrainer(EMConfig(max_iter=5, progress=True, noise_prior_variance=1e-3,
                                tempered_step=False))
    drawn = training.progress_bar

    def drawn_then_interrupted(*args, **kwargs):
        bar = drawn(*args, **kwargs)
        assert progress.open_bars() == 1
        raise KeyboardInterrupt(bar)

    def callback(trainer_, model_, record):
        if len(trainer_.history) == 2:
            raise KeyboardInterrupt

    if where != "in the loop":
        monkeypatch.setattr(training, "progress_bar", drawn_then_interrupted)
    try:
        fitter.fit(model, x, x[:50], callbacks=[callback])
    except KeyboardInterrupt:
        assert progress.open_bars() == 0
        assert handler.stream is sys.stderr
        print("interrupted", file=sys.stderr)
    else:
        pytest.fail("the fit was not interrupted")
    shown = screen(capsys.readouterr().err)
    assert [line for line in shown if "interrupted" in line] == ["interrupted"]
    assert not bar_fragments(shown), f"a bar left on screen: {shown}"


def test_close_bars_opened_since_closes_all_of_them(logger):
    """The bars opened after the first ``count``, all of them, the oldest of them included
    (the trainers' ``fit``: the bar of the fit that raised)."""
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    first = progress.progress_bar(range(3), True, desc="first", leave=False)
    count = progress.open_bars()
    later = [progress.progress_bar(range(3), True, desc=name, leave=False)
             for name in ("second", "third")]
    assert progress.open_bars() == count + 2
    progress.close_bars_opened_since(count)
    assert progress.open_bars() == count
    assert handler.stream is not sys.stderr  # (the first bar is still open)
    progress.close_bars_opened_since(0)
    assert progress.open_bars() == 0
    assert all(bar.disable for bar in (first, *later))  # (tqdm's mark of a closed bar)
    assert handler.stream is sys.stderr


@pytest.mark.filterwarnings("ignore:EM run 1/1. stopped at max_iter")
def test_a_fit_with_progress_off_draws_no_bar(capsys):
    """``progress=False``: no bar opened, nothing written to the console (a bar of
    ``leave=False`` erased at its end would not show on the final screen: the raw output)."""
    model = random_model(2, 5, 1, seed=0)
    x = random_data(200, model, seed=1)
    open_during = []
    EMTrainer(EMConfig(max_iter=3, progress=False, noise_prior_variance=1e-3,
                       tempered_step=False)).fit(
        model, x, x[:50], callbacks=[lambda *_: open_during.append(progress.open_bars())])
    assert open_during == [0, 0, 0]
    assert capsys.readouterr().err == ""


def test_a_stream_closed_while_a_bar_was_open_does_not_break_putting_back(
        monkeypatch, tmp_path, logger):
    """stdout redirected to a file that a handler also writes to, the file closed while a
    bar was open: putting that handler back flushed the closed file, so the bar's close()
    raised ValueError (out of the trainer's fit) and the handlers not put back yet (the
    console's) stayed routed through a bar that was gone."""
    console = logging.StreamHandler(sys.stderr)
    logger.addHandler(console)
    out = (tmp_path / "out.txt").open("w")
    monkeypatch.setattr(sys, "stdout", out)
    to_file = logging.StreamHandler(sys.stdout)
    logging.getLogger("mfa.test_progress_routing.to_file").addHandler(to_file)
    try:
        bar = progress.progress_bar(range(3), True, desc="EM run", leave=False)
        assert console.stream is not sys.stderr and to_file.stream is not out  # (routed)
        out.close()
        bar.close()
        assert progress.open_bars() == 0
        assert console.stream is sys.stderr and to_file.stream is out
    finally:
        logging.getLogger("mfa.test_progress_routing.to_file").removeHandler(to_file)
