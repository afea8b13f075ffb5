"""Progress bars on a terminal (tqdm), nothing when output is piped or machine-readable."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

Advance = Callable[[str], None]


class ProgressBar:
    """A bar that counts units of work; a no-op unless enabled."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="frame", leave=False, file=sys.stderr)

    def advance(self, note: str = "") -> None:
        if self._bar is not None:
            self._bar.update(1)
            if note:
                self._bar.set_postfix_str(note)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def terminal_output(machine_readable: bool = False) -> bool:
    """True when a person watches: stdout and stderr are terminals and no --json was asked."""
    return not machine_readable and sys.stdout.isatty() and sys.stderr.isatty()


def announce_loading(prog: str, what: str) -> Callable[[], None]:
    """Say on stderr, also without a terminal (piped output, logs), that ``what`` is loading,
    when a person will wait for it: in a fresh process, where torch is not imported yet (its
    imports and the model's take tens of seconds on a small machine). Returns the function that
    says how long it took (a no-op when nothing was said: in-process callers holding torch)."""
    if "torch" in sys.modules:
        return lambda: None
    start = time.perf_counter()
    print(f"{prog}: loading {what}: imports and weights...", file=sys.stderr, flush=True)
    return lambda: print(f"{prog}: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def step_lines(prog: str, stage: str) -> Callable[[int, int], None]:
    """``on_step(done, total)`` printing ``prog: stage done/total`` on stderr at each quarter:
    progress for a person reading piped output or a log (a terminal gets a bar instead)."""

    def on_step(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            print(f"{prog}: {stage} {done}/{total}", file=sys.stderr, flush=True)

    return on_step
