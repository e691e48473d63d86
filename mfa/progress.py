"""The trainers' progress bars, and the console output that goes through them while shown.

:func:`progress_bar` gives a ``tqdm.auto`` bar (or, switched off, the plain iterable). While
any such bar is open, what would be written to the console under it is written *through*
the bars: they are cleared first and redrawn below (tqdm's ``external_write_mode``). That
covers

* logging's console handlers: a ``StreamHandler`` (not a file's) on any logger whose stream
  is ``sys.stdout``, ``sys.stderr`` or the bar's own stream (``mfa``'s CLI sets one up with
  ``logging.basicConfig``); the handler is kept, only its stream is wrapped;
* ``logging.lastResort`` (a program that configured no logging: warnings on ``sys.stderr``);
* ``warnings.showwarning`` (Python's, or the CLI's one-line form).

Without it a log record was appended to the bar's line (``... ll=1829.4398]INFO
mfa.prior_search: ...``) and the bar's later redraws went to the next line, so the frozen
fragment stayed on screen above them. Everything is put back as it was once the last open
bar is closed: by its ``close()``, when its loop ends (also by an error or Ctrl-C inside it:
tqdm closes the bar as its iterator is dropped), or by :func:`close_bars_opened_since` (the
trainers' ``fit``); each step is undone only where nobody changed it meanwhile. One
process's bars are expected to be used from one thread.

tqdm is imported only when a bar is shown: in a Jupyter kernel without ipywidgets its import
warned ("IProgress not found") on ``import mfa``, also for fits with ``progress=False``.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator

__all__ = ["close_bars_opened_since", "open_bars", "progress_bar"]


class _NoBar:
    """:func:`progress_bar` when it is off: the iterable, and a bar's methods doing nothing."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def set_postfix(self, **_) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable, enabled: bool, **options):
    """A ``tqdm.auto`` bar over ``iterable`` (``options``: tqdm's, e.g. ``desc``, ``leave``)
    when ``enabled``, console output routed through it while it is open (see the module);
    else the iterable with no bar (``set_postfix`` and ``close`` doing nothing)."""
    if not enabled:
        return _NoBar(iterable)
    return _bar_class()(iterable, **options)


# the bars of progress_bar not closed yet, oldest first: weak references, so that a bar its
# caller dropped unclosed is closed by tqdm's __del__ (and the console put back) as a plain
# tqdm bar is, not kept alive and redrawn under every later log line
_open: list[weakref.ref] = []
_undo: list[Callable[[], None]] = []  # puts the console output back, last step first


def _live() -> list:
    return [bar for bar in (ref() for ref in _open) if bar is not None]


def open_bars() -> int:
    """How many bars of :func:`progress_bar` are open now."""
    return len(_live())


def close_bars_opened_since(count: int) -> None:
    """Close the bars opened after the first ``count`` (:func:`open_bars` before a fit), newest
    first: a fit that ended by an error or Ctrl-C leaves no bar on screen and no console
    output routed through a bar that is gone."""
    for bar in reversed(_live()[count:]):
        bar.close()


@functools.cache
def _bar_class() -> type:
    from tqdm.auto import tqdm

    class Bar(tqdm):
        """A bar that routes the console output through itself while open."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if not self.disable:
                _open.append(weakref.ref(self))
                _route_output(type(self), getattr(self.fp, "_wrapped", self.fp))

        def close(self) -> None:
            try:
                super().close()
            finally:  # (called again by a trainer after its loop closed it, and by __del__,
                # where the garbage collector may have cleared this bar's reference already)
                before = len(_open)  # (`is`, not `in`: bars compare equal by position)
                _open[:] = [ref for ref in _open if ref() is not None and ref() is not self]
                if len(_open) < before and not _open:
                    while _undo:
                        _undo.pop()()

    return Bar


class _BarSafeStream:
    """``stream`` (a console handler's) whose writes clear the open bars and redraw them
    after; any other attribute is the stream's."""

    def __init__(self, stream, bar_class: type) -> None:
        self.stream, self.bar_class = stream, bar_class

    def write(self, text: str):
        with self.bar_class.external_write_mode(file=self.stream):
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class _BarSafeHandler(logging.Handler):
    """``logging.lastResort`` (it writes to whatever ``sys.stderr`` is) with the bars
    cleared around each record."""

    def __init__(self, handler: logging.Handler, bar_class: type) -> None:
        super().__init__(handler.level)
        self.handler, self.bar_class = handler, bar_class

    def emit(self, record: logging.LogRecord) -> None:
        with self.bar_class.external_write_mode(file=sys.stderr):
            self.handler.handle(record)


def _route_output(bar_class: type, bar_stream) -> None:
    """Route through the bars the console handlers not routed yet (on ``sys.stdout``,
    ``sys.stderr`` or ``bar_stream``), ``logging.lastResort`` and ``warnings.showwarning``,
    queueing in ``_undo`` how to put each back."""
    streams = (sys.stdout, sys.stderr, bar_stream)
    known = list(logging.Logger.manager.loggerDict.values())  # (a copy: threads add loggers)
    loggers = [logging.getLogger(), *(item for item in known if isinstance(item, logging.Logger))]
    for handler in {id(h): h for lg in loggers for h in lg.handlers}.values():
        stream = getattr(handler, "stream", None)
        if (isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and any(stream is s for s in streams)):
            _swap(handler, _BarSafeStream(stream, bar_class))
    if logging.lastResort is not None and not isinstance(logging.lastResort, _BarSafeHandler):
        _swap_attribute(logging, "lastResort", _BarSafeHandler(logging.lastResort, bar_class))
    shown = warnings.showwarning
    if not getattr(shown, "through_bars", False):
        def show(message, category, filename, lineno, file=None, line=None):
            with bar_class.external_write_mode(file=sys.stderr if file is None else file):
                shown(message, category, filename, lineno, file, line)

        show.through_bars = True
        _swap_attribute(warnings, "showwarning", show)


def _swap(handler: logging.StreamHandler, routed: _BarSafeStream) -> None:
    """Give ``handler`` the ``routed`` stream; queue putting its own back."""
    try:
        handler.setStream(routed)
    except AttributeError:  # (a stream that is a read-only property, as lastResort's)
        return

    def undo() -> None:  # (not setStream: its flush raised for a stream closed meanwhile,
        # out of the bar's close(), and left the other handlers routed)
        handler.acquire()
        try:
            if handler.stream is routed:
                handler.stream = routed.stream
        finally:
            handler.release()

    _undo.append(undo)


def _swap_attribute(owner: object, name: str, value: object) -> None:
    """Set ``owner.name`` to ``value``; queue putting the old value back."""
    old = getattr(owner, name)
    setattr(owner, name, value)

    def undo() -> None:
        if getattr(owner, name) is value:
            setattr(owner, name, old)

    _undo.append(undo)
