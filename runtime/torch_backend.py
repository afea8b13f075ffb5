"""The reference backend: the PyTorch modules of a loaded bundle, on the device and in the
dtype the bundle's :attr:`~loc3r.models.bundle.Bundle.precision` names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loc3r.models.bundle import Bundle
from loc3r.models.llm import TorchLLM


def _placed(bundle: Bundle, tensor: Tensor) -> Tensor:
    """``tensor`` on the model's device, in its dtype."""
    return tensor.to(bundle.precision.device, bundle.precision.dtype)


@dataclass
class TorchCamera:
    bundle: Bundle

    @torch.inference_mode()
    def step(self, image: Tensor, state: Any | None) -> tuple[Tensor, Any]:
        model = self.bundle.model
        token, state = model.camera_encoder.step(_placed(self.bundle, image).unsqueeze(0), state)
        return model.heads.project_camera(token)[0], state


@dataclass
class TorchVision:
    bundle: Bundle

    @torch.inference_mode()
    def encode(self, pixels: Tensor) -> Tensor:
        return self.bundle.model.vision.encode(_placed(self.bundle, pixels))

    @torch.inference_mode()
    def video_end(self) -> Tensor:
        return self.bundle.model.vision.video_end()


@dataclass
class TorchHeads:
    bundle: Bundle

    @torch.inference_mode()
    def pose(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.bundle.model.heads.pose(pos_state, ori_state)

    @torch.inference_mode()
    def bev(self, vision_states: Tensor) -> Tensor:
        return self.bundle.model.heads.bev(vision_states)


def torch_stages(bundle: Bundle) -> tuple[TorchCamera, TorchVision, TorchHeads, TorchLLM]:
    """Camera, vision, heads and LLM stages over the bundle's modules."""
    return TorchCamera(bundle), TorchVision(bundle), TorchHeads(bundle), TorchLLM(bundle.model.llm)
