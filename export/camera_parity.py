"""The CUT3R graphs checked the way they run: the encoder on a batch of frames, then the
step frame by frame, each side carrying its own recurrent state.

Each side keeping its own state makes drift (a wrong RoPE row, an FP16 overflow) grow over
the recurrence and show, as it would at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

Arrays = Sequence[np.ndarray]


class CameraRunner(Protocol):
    """The two CUT3R graphs over numpy arrays, in their declared input/output order."""

    def encode(self, images: np.ndarray) -> Arrays: ...

    def step(self, *inputs: np.ndarray) -> Arrays: ...


@dataclass
class TorchRunner:
    """The PyTorch modules that were exported (the reference)."""

    encoder: nn.Module
    step_graph: nn.Module

    def encode(self, images: np.ndarray) -> Arrays:
        return self._run(self.encoder, images)

    def step(self, *inputs: np.ndarray) -> Arrays:
        return self._run(self.step_graph, *inputs)

    @staticmethod
    def _run(module: nn.Module, *inputs: np.ndarray) -> Arrays:
        with torch.inference_mode():
            return [t.numpy() for t in module(*(torch.from_numpy(x) for x in inputs))]


@dataclass
class SessionRunner:
    """Two ONNX Runtime sessions (FP32 or FP16 graphs)."""

    encoder: Any
    step_graph: Any

    def encode(self, images: np.ndarray) -> Arrays:
        return self.encoder.run(None, {self.encoder.get_inputs()[0].name: images})

    def step(self, *inputs: np.ndarray) -> Arrays:
        names = [value.name for value in self.step_graph.get_inputs()]
        return self.step_graph.run(None, dict(zip(names, inputs, strict=True)))


@dataclass
class Recurrence:
    """What one side produced: the encoder's outputs, and each frame's step outputs."""

    encoded: Arrays
    steps: list[Arrays]

    def first(self, frames: int) -> Recurrence:
        """The outputs for the first ``frames`` frames (the recurrence is causal, so they are
        what a run over only those frames gives)."""
        features, *rest = self.encoded
        return Recurrence([features[:frames], *rest], self.steps[:frames])


def run_recurrence(runner: CameraRunner, images: np.ndarray, state: np.ndarray, memory: np.ndarray) -> Recurrence:
    """Encode ``images`` (F, 3, H, W) at once, then step through them from ``state``/``memory``."""
    features, positions = runner.encode(images)[:2]
    steps = []
    for frame in range(len(images)):
        first = np.array([1.0 if frame == 0 else 0.0], dtype=np.float32)
        outputs = runner.step(features[frame : frame + 1], positions, state, memory, first)
        steps.append(outputs)
        _, state, memory = outputs
    return Recurrence([features, positions], steps)


def fixed_images(frames: int, size: tuple[int, int], seed: int = 1234) -> np.ndarray:
    """Fixed random frames in [-1, 1]: the same on every machine for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(frames, 3, *size, generator=generator) * 2 - 1).numpy()
