"""Run a console script's ``main`` as a fresh process would, then write the names of every
module the process imported to a file (at exit, whatever the exit code).

Usage: ``python tests/module_probe.py OUT module:function ARGS...``.
"""

import atexit
import importlib
import sys
from pathlib import Path


def main() -> int:
    out, target, *argv = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text("\n".join(sorted(sys.modules)) + "\n", encoding="utf-8"))
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(argv)


if __name__ == "__main__":
    sys.exit(main())
