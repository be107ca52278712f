"""Scripts run around the method: data preparation, the synthetic set, pictures,
features and probes, tables, converters, benchmarks and the GPU check.

Run each as `python tools/NAME.py ...` from the repository root. They import
the seven component files; none of those imports anything from here. Below:
the Ctrl-C handling the long-running scripts share.
"""
import signal
from contextlib import contextmanager


def run_script(main) -> None:
    """Run a script's main(): from here on Ctrl-C is train.run_cli's (cleaned up, one line, exit 130);
    once main has ended, a late Ctrl-C cannot turn the exit into a traceback."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def sigint_held():
    """Hold Ctrl-C back while worker processes start: they are born with SIGINT blocked (a Ctrl-C to the
    process group reaches only this process, no half-started worker prints a traceback), and this
    process gets a Ctrl-C that came meanwhile as soon as they are up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
