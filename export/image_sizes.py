"""The CUT3R input sizes an export serves (read by the runtimes, so free of torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loc3r.errors import InputError


@dataclass(frozen=True)
class ImageSizes:
    """The CUT3R input sizes an export serves: the long side is the model's (``cut3r_input``
    resizes every frame to it), the short side anything from ``min_short_side`` to it, both
    multiples of the patch: landscape, portrait and square frames alike."""

    long_side: int
    min_short_side: int
    patch: int

    #: widest aspect ratio served (4:1); TensorRT profiles need a lower bound
    MAX_ASPECT = 4

    @classmethod
    def for_model(cls, long_side: int, patch: int) -> ImageSizes:
        long_side = long_side // patch * patch
        return cls(long_side, math.ceil(long_side / cls.MAX_ASPECT / patch) * patch, patch)

    def aspect(self, height_ratio: int, width_ratio: int) -> tuple[int, int]:
        """(height, width) of a height_ratio:width_ratio frame, e.g. 9:16 -> (512, 288)."""
        short = self.long_side * min(height_ratio, width_ratio) // max(height_ratio, width_ratio)
        short = max(self.min_short_side, short // self.patch * self.patch)
        return (short, self.long_side) if width_ratio >= height_ratio else (self.long_side, short)

    def check(self, height: int, width: int) -> None:
        """Refuse a frame size the exported graphs and engines do not serve."""
        short, long = sorted((height, width))
        if height % self.patch or width % self.patch or long != self.long_side or short < self.min_short_side:
            raise InputError(
                f"a {height}x{width} CUT3R input is outside what the export serves (multiples of {self.patch}, "
                f"long side {self.long_side}, short side {self.min_short_side}..{self.long_side})",
                f"use frames no wider than {self.MAX_ASPECT}:1 (they are resized to a long side of {self.long_side})",
            )

    def to_dict(self) -> dict[str, int]:
        return {"long_side": self.long_side, "min_short_side": self.min_short_side, "patch": self.patch}
