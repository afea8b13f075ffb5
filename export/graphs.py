"""Each exported graph declared once: inputs, outputs, dynamic axes, parity tolerance.

The export mechanics (``export/onnx_export.py``) and the runtime backends read these
declarations; nothing else restates a graph's names or shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loc3r.export.image_sizes import ImageSizes  # noqa: F401 - re-exported beside the graphs it sizes
from loc3r.models.cut3r import Cut3rCameraEncoder
from loc3r.models.heads import Loc3rHeads
from loc3r.models.vggt import VggtCameraEncoder
from loc3r.models.vision import VisionPath

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    """One graph's interface and how closely ONNX Runtime must match PyTorch."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: float
    rtol: float
    # ONNX op types kept in FP32 inside FP16 TensorRT engines (overflow/precision risk)
    fp32_ops: tuple[str, ...] = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Sin", "Cos")
    # float inputs that carry positions, not activations: what they feed (RoPE angles,
    # cos/sin tables) stays FP32 in FP16 builds, like everything computed from shapes alone
    position_inputs: tuple[str, ...] = ()
    # dynamic axes that must be a multiple of a size (image height/width: the patch size)
    axis_multiples: tuple[tuple[str, int], ...] = ()
    # FP16 graphs/engines vs fp32: worst |error| / largest |reference| of each output
    fp16_tolerance: float = 2e-2
    # INT8 graphs (``loc3r-export --encoders int8``) vs fp32, measured the same way
    int8_tolerance: float = 5e-2

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for spec in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            if named:
                axes[spec.name] = named
        return axes

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
            "fp16_tolerance": self.fp16_tolerance,
            "int8_tolerance": self.int8_tolerance,
            "fp32_ops": list(self.fp32_ops),
            "position_inputs": list(self.position_inputs),
        }


#: aspect ratios (height:width) at which the CUT3R graphs are checked against PyTorch
PARITY_ASPECTS: dict[str, tuple[int, int]] = {"4:3": (3, 4), "16:9": (9, 16), "9:16": (16, 9), "1:1": (1, 1)}


class CameraEncoderGraph(nn.Module):
    """CUT3R's ViT encoder: frames (F, 3, H, W) -> tokens (F, P, enc_dim) and patch positions (P, 2).

    It does not depend on the recurrent state, so a streaming batch of frames goes
    through it at once; H and W are dynamic (multiples of the patch size) and the RoPE
    positions are computed in the graph from them.
    """

    def __init__(self, encoder: Cut3rCameraEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder.encode_images(image)


class CameraStepGraph(nn.Module):
    """The recurrent half of a CUT3R step fused with ``f_cam``:
    (features, positions, state, memory, first_frame) -> (camera, state, memory).

    The first frame takes the learned pose token instead of a memory query; the runtime
    says which with ``first_frame`` (1.0 or 0.0), so one graph (one set of weights, one
    engine) serves every frame. The encoder and this graph hold disjoint weights.
    """

    def __init__(self, encoder: Cut3rCameraEncoder, heads: Loc3rHeads) -> None:
        super().__init__()
        self.encoder, self.heads = encoder, heads

    def forward(
        self, features: Tensor, positions: Tensor, state: Tensor, memory: Tensor, first_frame: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        token, state, memory = self.encoder.decode_step(features, positions, state, memory, first_frame)
        return self.heads.project_camera(token), state, memory


class CameraClipGraph(nn.Module):
    """A whole clip through VGGT's aggregator, fused with ``f_cam``: images (frames, 3, H, W)
    in [0, 1] -> camera (frames, width); ``heads=None`` leaves the raw camera tokens.

    The frame count is free; H and W are fixed, so the patch embedding's position table
    (a bicubic, antialiased resize of the learned one) is computed here once and becomes a
    constant of the graph.
    """

    def __init__(self, encoder: VggtCameraEncoder, heads: Loc3rHeads | None, height: int, width: int) -> None:
        super().__init__()
        self.encoder, self.heads = encoder, heads
        patch = encoder.config.patch_size
        with torch.no_grad():
            table = encoder.patch_embed.position_embedding(height // patch, width // patch)
        self.register_buffer("pos_embed", table.detach().clone(), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.encoder(images[None], self.pos_embed)[0]
        return tokens if self.heads is None else self.heads.project_camera(tokens)


class VisionGraph(nn.Module):
    """Frames (N, 3, S, S) -> pooled, projected tokens with row newlines (N, V, width)."""

    def __init__(self, vision: VisionPath) -> None:
        super().__init__()
        self.vision = vision

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision.encode(pixels)


class PoseHeadGraph(nn.Module):
    """``<Pos>``/``<Ori>`` states (B, width) -> xy (B, 2), sigma (B,), theta (B,)."""

    def __init__(self, heads: Loc3rHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, pos_state: Tensor, ori_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.heads.pose(pos_state, ori_state)


class BevHeadGraph(nn.Module):
    """Vision-token states (n, width) -> BEV points (n, 2)."""

    def __init__(self, heads: Loc3rHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, states: Tensor) -> Tensor:
        return self.heads.bev(states)


def camera_encoder_spec(enc_dim: int, patch: int) -> GraphSpec:
    """``cut3r_encoder``: any frame count and any height/width that are multiples of ``patch``."""
    return GraphSpec(
        name="cut3r_encoder",
        inputs=(TensorSpec("image", ("frames", 3, "height", "width")),),
        outputs=(TensorSpec("features", ("frames", "patches", enc_dim)), TensorSpec("positions", ("patches", 2))),
        # CroCo rounds q and k to float16 before RoPE (fp32 runs too): a one-ulp flip between two
        # correct runtimes moves a raw feature by up to ~3e-4 of the output's scale (measured
        # 1.5e-3 at scale 4.9 on a random tiny checkpoint); the step's camera token stays at 1e-4
        atol=5e-4,
        rtol=1e-3,
        axis_multiples=(("height", patch), ("width", patch)),
    )


def camera_step_spec(enc_dim: int, state: tuple[int, ...], memory: tuple[int, ...], llm_width: int) -> GraphSpec:
    """``cut3r_step``: one frame's encoder output (any patch count) and the recurrent state."""
    return GraphSpec(
        name="cut3r_step",
        inputs=(
            TensorSpec("features", (1, "patches", enc_dim)),
            TensorSpec("positions", ("patches", 2)),
            TensorSpec("state", (1, *state)),
            TensorSpec("memory", (1, *memory)),
            TensorSpec("first_frame", (1,)),
        ),
        outputs=(
            TensorSpec("camera", (1, llm_width)),
            TensorSpec("new_state", (1, *state)),
            TensorSpec("new_memory", (1, *memory)),
        ),
        atol=1e-4,
        rtol=1e-3,
        position_inputs=("positions",),
    )


def camera_clip_spec(height: int, width: int, width_out: int) -> GraphSpec:
    """``vggt_encode`` at a fixed input resolution; ``clip_frames`` is dynamic."""
    return GraphSpec(
        name="vggt_encode",
        inputs=(TensorSpec("images", ("clip_frames", 3, height, width)),),
        outputs=(TensorSpec("camera", ("clip_frames", width_out)),),
        atol=1e-4,
        rtol=1e-3,
    )


def vision_spec(image_size: int, tokens: int, llm_width: int) -> GraphSpec:
    return GraphSpec(
        name="vision",
        inputs=(TensorSpec("pixels", ("frames", 3, image_size, image_size)),),
        outputs=(TensorSpec("tokens", ("frames", tokens, llm_width)),),
        atol=1e-4,
        rtol=1e-3,
    )


def pose_head_spec(llm_width: int) -> GraphSpec:
    return GraphSpec(
        name="pose_head",
        inputs=(TensorSpec("pos_state", ("batch", llm_width)), TensorSpec("ori_state", ("batch", llm_width))),
        outputs=(TensorSpec("xy", ("batch", 2)), TensorSpec("sigma", ("batch",)), TensorSpec("theta", ("batch",))),
        atol=1e-5,
        rtol=1e-4,
    )


def bev_head_spec(llm_width: int) -> GraphSpec:
    return GraphSpec(
        name="bev_head",
        inputs=(TensorSpec("states", ("tokens", llm_width)),),
        outputs=(TensorSpec("points", ("tokens", 2)),),
        atol=1e-5,
        rtol=1e-4,
    )


def random_inputs(spec: GraphSpec, generator: torch.Generator, dynamic_sizes: dict[str, int]) -> tuple[Tensor, ...]:
    """Fresh inputs for a parity check; dynamic axes take ``dynamic_sizes``."""
    tensors = []
    for tensor in spec.inputs:
        shape = [dynamic_sizes[d] if isinstance(d, str) else d for d in tensor.shape]
        tensors.append(torch.randn(*shape, generator=generator))
    return tuple(tensors)
