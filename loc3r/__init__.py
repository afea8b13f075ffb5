"""loc3r: edge inference runtime for Loc3R-VLM.

``from loc3r import Pipeline`` (imported on first use, so ``import loc3r`` stays light).
"""

from __future__ import annotations

from loc3r.lazy import lazy_exports

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]
__getattr__ = lazy_exports(__name__, {"Pipeline": "runtime.pipeline"})
