"""The reference backend: the PyTorch modules of a loaded bundle, on the device and in the
dtype the bundle's :attr:`~loc3r.models.bundle.Bundle.precision` names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from loc3r.models.bundle import Bundle
from loc3r.models.cut3r import Cut3rState
from loc3r.models.llm import TorchLLM
from loc3r.runtime.stages import CameraStage, EncodeBySteps


def _placed(bundle: Bundle, tensor: Tensor) -> Tensor:
    """``tensor`` (or a numpy array: the session's preprocessed frames) on the model's device, in its dtype."""
    return torch.as_tensor(tensor).to(bundle.precision.device, bundle.precision.dtype)


@dataclass
class TorchCamera(EncodeBySteps):
    """A streaming encoder (CUT3R) + f_cam."""

    bundle: Bundle

    @torch.inference_mode()
    def encode_frames(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        features, positions = self.bundle.model.camera_encoder.encode_images(_placed(self.bundle, images))
        return [(features[i : i + 1], positions) for i in range(len(features))]

    @torch.inference_mode()
    def step(self, encoded: tuple[Tensor, Tensor], state: Cut3rState | None) -> tuple[Tensor, Cut3rState]:
        model = self.bundle.model
        state = state or model.camera_encoder.init_state(1)
        token, state_feat, memory = model.camera_encoder.decode_step(*encoded, state.state_feat, state.memory, state.frame_index == 0)
        return model.heads.project_camera(token)[0], Cut3rState(state_feat, memory, state.frame_index + 1)


@dataclass
class TorchClipCamera:
    """A whole-clip encoder (VGGT) + f_cam."""

    bundle: Bundle

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        model = self.bundle.model
        return model.heads.project_camera(model.camera_encoder.encode(_placed(self.bundle, images)))


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


def torch_stages(bundle: Bundle) -> tuple[CameraStage, TorchVision, TorchHeads, TorchLLM]:
    """Camera, vision, heads and LLM stages over the bundle's modules."""
    camera = TorchCamera(bundle) if bundle.model.camera_encoder.streaming else TorchClipCamera(bundle)
    return camera, TorchVision(bundle), TorchHeads(bundle), TorchLLM(bundle.model.llm)
