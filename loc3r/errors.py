"""Error types that the command-line tools turn into one-line messages and exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class Loc3rError(Exception):
    """An expected failure: the message says what is wrong and what to do.

    ``exit_code`` is 2 for usage and input errors, 1 for internal ones.
    """

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}: {fix}" if fix else problem)

    def lines(self) -> list[str]:
        """The error as the lines a command prints (one, unless several problems were found)."""
        return [str(self)]


class InputError(Loc3rError):
    """Bad input from the user: a path, a video, a question, a flag."""

    exit_code = 2


class ModelError(InputError):
    """A checkpoint, bundle, manifest or engine that cannot be used as asked."""


class Problems(InputError):
    """Several problems found at once (a preflight check): one line each, with its fix."""

    def __init__(self, problems: list[Loc3rError]) -> None:
        self.problems = problems
        self.exit_code = max(p.exit_code for p in problems)
        super().__init__(str(problems[0]))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


class InternalError(Loc3rError):
    """Something that should not happen; a bug or a broken installation."""

    exit_code = 1


class QuestionFailed(InternalError):
    """One question failed inside the model (e.g. a Rust panic in the tokenizer, raised through
    pyo3 as ``PanicException``, a ``BaseException``); the model and its video stay usable."""


@contextmanager
def one_question() -> Iterator[None]:
    """Turn any ``BaseException`` but an interrupt or an exit into :class:`QuestionFailed`
    (``Exception``s pass unchanged: they are already errors a caller handles)."""
    try:
        yield
    except (Exception, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a native panic: this question's error, not the process's end
        raise question_failed(exc) from exc


def question_failed(exc: BaseException) -> QuestionFailed:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return QuestionFailed(
        f"this question could not be answered ({type(exc).__name__}{': ' + detail if detail else ''})",
        "the model is still loaded; ask another question (rerun with --debug for the traceback)",
    )


class RandomWeightsWarning(UserWarning):
    """A model whose outputs mean nothing (random weights, untrained localization heads) was
    loaded: shown by ``Pipeline.from_pretrained``; the command-line tools say it in their
    own output instead (``NOTE:`` lines, the JSON's ``warning``, the server's banner)."""
