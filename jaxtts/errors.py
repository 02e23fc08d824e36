"""User-facing errors: one line saying what is wrong and what to do, never a traceback."""

from __future__ import annotations

import argparse
import functools
import sys


class JaxttsError(Exception):
    """A problem the user can fix (bad input, missing file, wrong checkpoint).

    The command-line tools print its message as a single line on stderr and exit with status 2.
    """


def cli_entry(main):
    """Wrap a CLI `main(argv) -> int` so that JaxttsError becomes one stderr line and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except JaxttsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (via JaxttsError), like every other error."""

    def error(self, message):
        raise JaxttsError(f"{self.prog}: {message} (see --help)")
