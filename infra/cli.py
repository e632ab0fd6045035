"""The user-error contract of every script, clean stops on Ctrl-C or SIGTERM, and quiet libraries.

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
    """Run a script's `main(argv)`; a `UserError` becomes one line on stderr and exit status 2, and
    a stop at once (a second Ctrl-C, or one before a script catches signals) one line and 130."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: stopped at once; every file written so far is whole: --resume continues a run from its "
              "last checkpoint, and the same command starts again a run that had none", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def stop_signals():
    """Catch SIGINT and SIGTERM into a list, which the caller checks between steps; a second
    signal stops at once (KeyboardInterrupt). The old handlers are restored after."""
    stop = []

    def handle(signum, frame):
        stop.append(signal.Signals(signum).name)
        if len(stop) > 1:
            raise KeyboardInterrupt
        print(f"{stop[0]}: stopping after the step in flight, with a checkpoint; send it again to stop at once",
              file=sys.stderr)

    catch = [getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name)]  # what the OS has
    previous = {sig: signal.signal(sig, handle) for sig in catch}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def quiet_libraries():
    """Silence diffusers' and transformers' per-file progress bars and warnings.

    For the tiny model they are pure noise (and would break the one-line error contract on
    stderr); the hub's download progress comes from huggingface_hub and stays visible.
    """
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
