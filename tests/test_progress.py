"""mfa.progress: console output written while a trainer's progress bar is shown (a log record,
a warning) starts its own line, no bar is left on screen, and the console is put back after,
also after Ctrl-C. Checked on what a terminal shows of the captured stderr (``\\r`` returns to
the line's start, later text overwrites)."""

import logging
import sys
import warnings

import pytest
from helpers import BAR, random_data, random_model, screen

from mfa.em import EMConfig, EMTrainer
from mfa.sgd import SGDConfig, SGDTrainer

pytestmark = pytest.mark.usefixtures("one_thread")



def one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)  # as the mfa command shows a warning


@pytest.mark.parametrize("trainer", ["em", "sgd"])
@pytest.mark.parametrize("interrupt", [False, True])
def test_output_during_a_bar_starts_its_own_line_and_the_console_is_put_back(
        capsys, trainer, interrupt):
    model = random_model(2, 5, 1, seed=0)
    x = random_data(200, model, seed=1)
    fitter = (EMTrainer(EMConfig(max_iter=3, progress=True, noise_prior_variance=1e-3,
                                 tempered_step=False))
              if trainer == "em" else SGDTrainer(SGDConfig(epochs=3, progress=True)))
    handler = logging.StreamHandler(sys.stderr)  # as mfa's CLI: logging.basicConfig
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("mfa.test_progress")
    root = logging.getLogger()
    root.addHandler(handler)
    before = (root.level, log.level, logging.lastResort)

    def callback(trainer_, model_, record):
        log.info("step %d done", len(trainer_.history))
        warnings.warn(f"step {len(trainer_.history)} warned", UserWarning, stacklevel=2)
        if interrupt and len(trainer_.history) == 2:
            raise KeyboardInterrupt

    try:
        log.setLevel(logging.INFO)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("always", message="step ")
            warnings.showwarning = one_line
            try:
                fitter.fit(model, x, x[:50], callbacks=[callback])
            except KeyboardInterrupt:
                assert interrupt
            # the console as it was (the Ctrl-C included), once the bar is gone
            assert handler.stream is sys.stderr
            assert warnings.showwarning is one_line
        assert logging.lastResort is before[2]
    finally:
        root.removeHandler(handler)
        log.setLevel(before[1])
    shown = screen(capsys.readouterr().err)
    steps = 2 if interrupt else 3
    assert [line for line in shown if "step" in line] == [
        text for i in range(1, steps + 1)
        for text in (f"INFO mfa.test_progress: step {i} done", f"warning: step {i} warned")]
    left = [line for line in shown if any(part in line for part in BAR)]
    assert not left, f"a bar left on screen: {left}"


def test_a_bar_dropped_unclosed_puts_the_console_back(capsys):
    """A bar its caller dropped without iterating or closing it stayed open for good: its
    list kept it alive, so tqdm never closed it, the console handlers stayed routed through
    it, and its frozen line was redrawn under every later log record. (A bar whose iterator
    is dropped mid-loop is closed by tqdm's iterator itself.)"""
    import gc

    from mfa import progress

    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    shown, last_resort = warnings.showwarning, logging.lastResort
    try:
        bar = progress.progress_bar(range(10), True, desc="dropped")
        assert progress.open_bars() == 1 and handler.stream is not sys.stderr
        del bar
        gc.collect()
        assert progress.open_bars() == 0
        assert handler.stream is sys.stderr
        assert warnings.showwarning is shown and logging.lastResort is last_resort
    finally:
        root.removeHandler(handler)
