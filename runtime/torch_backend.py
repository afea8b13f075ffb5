"""The reference backend: the PyTorch modules of a loaded bundle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from loc3r.models.bundle import Bundle
from loc3r.models.cut3r import Cut3rState
from loc3r.models.llm import TorchLLM


@dataclass
class TorchCamera:
    bundle: Bundle

    @torch.inference_mode()
    def encode(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        features, positions = self.bundle.model.camera_encoder.encode_images(images)
        return [(features[i : i + 1], positions) for i in range(len(features))]

    @torch.inference_mode()
    def step(self, encoded: tuple[Tensor, Tensor], state: Cut3rState | None) -> tuple[Tensor, Cut3rState]:
        model = self.bundle.model
        state = state or model.camera_encoder.init_state(1)
        token, state_feat, memory = model.camera_encoder.decode_step(*encoded, state.state_feat, state.memory, state.frame_index == 0)
        return model.heads.project_camera(token)[0], Cut3rState(state_feat, memory, state.frame_index + 1)


@dataclass
class TorchVision:
    bundle: Bundle

    @torch.inference_mode()
    def encode(self, pixels: Tensor) -> Tensor:
        return self.bundle.model.vision.encode(pixels)


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
