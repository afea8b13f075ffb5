"""Error types that the command-line tools turn into one-line messages and exit codes."""

from __future__ import annotations


class Loc3rError(Exception):
    """An expected failure: the message says what is wrong and what to do.

    ``exit_code`` is 2 for usage and input errors, 1 for internal ones.
    """

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}: {fix}" if fix else problem)


class InputError(Loc3rError):
    """Bad input from the user: a path, a video, a question, a flag."""

    exit_code = 2


class ModelError(InputError):
    """A checkpoint, bundle, manifest or engine that cannot be used as asked."""


class InternalError(Loc3rError):
    """Something that should not happen; a bug or a broken installation."""

    exit_code = 1


class RandomWeightsWarning(UserWarning):
    """A model whose outputs mean nothing (random weights, untrained localization heads) was
    loaded: shown by ``Pipeline.from_pretrained``; the command-line tools say it in their
    own output instead (``NOTE:`` lines, the JSON's ``warning``, the server's banner)."""
