"""User-facing errors: one line saying what is wrong and what to do, never a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
import warnings


class JaxttsError(Exception):
    """A problem the user can fix (bad input, missing file, wrong checkpoint).

    The command-line tools print its message as a single line on stderr and exit with status 2.
    """


def cli_entry(main=None, *, prog: str = "jaxtts"):
    """Wrap a CLI `main(argv) -> int`: a JaxttsError becomes one stderr line and exit 2; any other
    exception one "internal error" line and exit 1 (the traceback with --debug or JAXTTS_DEBUG=1)."""
    if main is None:
        return functools.partial(cli_entry, prog=prog)

    @functools.wraps(main)
    def wrapper(argv=None):
        args = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in args or os.environ.get("JAXTTS_DEBUG", "") not in ("", "0")
        try:
            with warnings.catch_warnings():
                if not debug:  # a warning is one line too, not "file:line: UserWarning" and a line of source
                    warnings.showwarning = _one_line_warning
                return main(argv)
        except JaxttsError as e:
            if debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # the last line of defence: one line, not a traceback
            if debug:
                traceback.print_exc()
            message = " ".join(str(e).split())[:300]
            print(
                f"{prog}: internal error: {type(e).__name__}: {message} "
                "(run with --debug or JAXTTS_DEBUG=1 for the traceback)",
                file=sys.stderr,
            )
            return 1

    return wrapper


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (via JaxttsError), like every other error."""

    def error(self, message):
        raise JaxttsError(f"{self.prog}: {message} (see --help)")
