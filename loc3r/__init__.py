"""loc3r: edge inference runtime for Loc3R-VLM.

``from loc3r import Pipeline`` (imported on first use, so ``import loc3r`` stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from loc3r.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'loc3r' has no attribute {name!r}")
