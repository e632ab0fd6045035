"""The user-error contract of every script, and clean stops on Ctrl-C or SIGTERM.

Bad input (a missing prompts file, an unknown reward, a flag out of range) is the user's to fix,
not a bug. The code raises `UserError`; `run_cli` turns it into one line on stderr and exit
status 2, with no traceback. Genuine bugs still raise normally and show their traceback.
"""
import contextlib
import signal
import sys


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix, in one line."""


def run_cli(main, argv=None):
    """Run a script's `main(argv)`; a `UserError` becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def stop_signals():
    """Catch SIGINT and SIGTERM into a list (checked after each step); restore the old handlers after."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
