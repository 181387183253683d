"""Command-line errors as one line, `PROG: error: MESSAGE`, and exit code 2 (argparse's):
no traceback, no page of usage in front of the one line that matters."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import NoReturn

HINT = " (see --help)"


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(code)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line plus a pointer to --help."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message + HINT)


@contextlib.contextmanager
def one_line_errors(prog: str):
    """Every argparse parser used inside (SGLang's included) reports as one line."""
    orig = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = lambda self, message: fail(prog, message + HINT)
    try:
        yield
    finally:
        argparse.ArgumentParser.error = orig
