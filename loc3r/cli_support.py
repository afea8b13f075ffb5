"""Shared command-line behaviour: one-line errors, exit codes, no tracebacks unless --debug."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from loc3r.errors import Loc3rError

EXIT_INTERRUPTED = 130


def run_cli(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run ``body``; turn every failure into ``prog: error: ...`` on stderr and an exit code."""
    try:
        return body()
    except Loc3rError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if debug:
            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(
            f"{prog}: internal error: {type(exc).__name__}: {detail} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
