"""Importing MindFormers without its import-time console noise.

Importing MindFormers 1.9 logs WARNINGs that concern nothing the user did (its PyNative Qwen3 /
DeepSeek-V3 models need the optional ``hyper_parallel`` package; MindFormers imports a MindSpore
module deprecated in 2.9) on stdout / stderr, under a logger name with the log path glued to it
(``mindformers/root/.cache/.../log``). :func:`console_to_log` sends what Python writes to the
console during the import to a log file instead; MindFormers' and MindSpore's own log files keep
their records, and the console shows only what the user's program prints.
"""

import contextlib
import logging
import os
import sys


class _LogFile:
    """``path`` opened for appending at the first write (no empty file when nothing is written)."""

    def __init__(self, path):
        self.path = path
        self._file = None

    def write(self, text):
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # pylint: disable-next=consider-using-with
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file.write(text)

    def flush(self):
        if self._file is not None:
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()


class _LogStream:
    """A text stream writing to a :class:`_LogFile` in place of the console stream ``console``."""

    def __init__(self, log_file, console):
        self.log_file = log_file
        self.console = console

    def write(self, text):
        return self.log_file.write(text)

    def flush(self):
        self.log_file.flush()


def _is_console(handler):
    return (isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            # logging's last-resort handler always writes to sys.stderr (a read-only property)
            and not isinstance(getattr(type(handler), "stream", None), property))


def _console_handlers():
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)]
    return [handler for logger in loggers for handler in logger.handlers if _is_console(handler)]


@contextlib.contextmanager
def console_to_log(path):
    """Inside the block, console output of Python code and of logging handlers goes to ``path``.

    Handlers that exist already are pointed at ``path`` for the block and back afterwards; those
    created inside the block (MindFormers and MindSpore create theirs at their first record) get
    the console stream they captured afterwards. Output of C++ code (MindSpore's glog) is not
    affected.
    """
    log_file = _LogFile(path)
    stdout = _LogStream(log_file, sys.stdout)
    stderr = _LogStream(log_file, sys.stderr)
    stand_ins = {id(stdout.console): stdout, id(stderr.console): stderr}
    redirected = [(handler, handler.stream) for handler in _console_handlers()
                  if id(handler.stream) in stand_ins]
    for handler, console in redirected:
        handler.setStream(stand_ins[id(console)])
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            yield
    finally:
        for handler, console in redirected:
            handler.setStream(console)
        for handler in _console_handlers():
            if isinstance(handler.stream, _LogStream):
                handler.setStream(handler.stream.console)
        log_file.close()


def name_mindformers_console_logger(mindformers_logger):
    """Shows MindFormers' console records as ``mindformers``, not under its logger's name.

    MindFormers names its logger ``"mindformers" + <log directory>`` and prints that name on the
    console (``mindformers/root/.cache/.../log[...]``); its log files do not show the name.
    """
    for handler in mindformers_logger.handlers:
        if _is_console(handler) and handler.formatter is not None:
            pattern = handler.formatter._fmt  # pylint: disable=protected-access
            named = pattern.replace("%(name)s", "mindformers")
            handler.setFormatter(type(handler.formatter)(named))
