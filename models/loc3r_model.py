"""Loc3R-VLM assembled from its parts; parameter names are the bundle's tensor names."""

from __future__ import annotations

from torch import nn
from transformers import Qwen2ForCausalLM

from loc3r.models.config import Loc3rConfig
from loc3r.models.cut3r import Cut3rCameraEncoder, Cut3rConfig
from loc3r.models.heads import Loc3rHeads
from loc3r.models.llm import build_qwen2
from loc3r.models.vision import VisionPath


class Loc3rModel(nn.Module):
    """CUT3R camera encoder, SigLIP vision path, Qwen2 LLM and the Loc3R heads.

    Tensor names: ``camera_encoder.*`` (CUT3R's own names), ``vision.*``, ``llm.*``
    (transformers' Qwen2ForCausalLM names) and ``heads.f_{cam,pos,ori,bev}.*``.
    """

    def __init__(self, config: Loc3rConfig) -> None:
        super().__init__()
        self.config = config
        self.camera_encoder = Cut3rCameraEncoder(Cut3rConfig.from_dict(config.cut3r))
        self.vision = VisionPath(config)
        self.llm: Qwen2ForCausalLM = build_qwen2(config.llm)
        self.heads = Loc3rHeads(config, self.camera_encoder.camera_dim)
        self.eval()
