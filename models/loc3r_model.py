"""Loc3R-VLM assembled from its parts; parameter names are the bundle's tensor names."""

from __future__ import annotations

from torch import nn
from transformers import Qwen2ForCausalLM

from loc3r.models.config import Loc3rConfig
from loc3r.models.encoder3d import build_camera_encoder
from loc3r.models.heads import Loc3rHeads
from loc3r.models.llm import build_qwen2
from loc3r.models.vision import VisionPath


class Loc3rModel(nn.Module):
    """3D camera encoder (CUT3R or VGGT), SigLIP vision path, Qwen2 LLM and the Loc3R heads.

    Tensor names: ``camera_encoder.*`` (the encoder checkpoint's own names), ``vision.*``, ``llm.*``
    (transformers' Qwen2ForCausalLM names) and ``heads.f_{cam,pos,ori,bev}.*``.
    """

    def __init__(self, config: Loc3rConfig) -> None:
        super().__init__()
        self.config = config
        self.camera_encoder = build_camera_encoder(config)
        self.vision = VisionPath(config)
        self.llm: Qwen2ForCausalLM = build_qwen2(config.llm)
        self.heads = Loc3rHeads(config, self.camera_encoder.camera_dim)
        self.eval()
