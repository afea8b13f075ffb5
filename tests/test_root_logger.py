"""``kept_root_logger``: what onnxruntime's quantizers do to the root logger is undone."""

from __future__ import annotations

import logging

import pytest

from loc3r.export.root_logger import kept_root_logger


def test_the_root_logger_is_put_back_after_basic_config_and_after_an_error() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with kept_root_logger(logging.ERROR):
        assert root.level == logging.ERROR
        logging.basicConfig(level=logging.INFO, force=True)  # what the quantizer module does on import
    assert root.handlers == handlers and root.level == level
    with pytest.raises(RuntimeError), kept_root_logger():
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.DEBUG)
        raise RuntimeError("quantizer failed")
    assert root.handlers == handlers and root.level == level
