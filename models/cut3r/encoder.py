"""CUT3R camera-token encoder: ViT encoder, two-stream decoder, state and pose memory.

Per frame: encode the image; the pose token is ``pose_token`` on the first frame and is
read from the pose memory with the mean image token afterwards; the image stream
(pose token + image tokens) and the state stream decode side by side, each attending to
the other's previous layer; new state = ``dec_norm_state(state stream)``; the camera
token is ``dec_norm(image stream)[:, 0]``; the memory stores (mean image token, camera
token). At inference the reference's update/reset masks are all-true/all-false, so the
state and memory are simply replaced.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loc3r.errors import InputError
from loc3r.models.cut3r.blocks import DecoderBlock, EncoderBlock, PatchEmbed
from loc3r.models.cut3r.config import Cut3rConfig
from loc3r.models.cut3r.memory import PoseMemory
from loc3r.models.cut3r.rope import patch_positions, rope_tables, state_positions
from loc3r.models.cut3r.state import Cut3rState


class Cut3rCameraEncoder(nn.Module):
    """The camera-token path of ``ARCroco3DStereo``; parameter names match the checkpoint."""

    streaming = True  # one frame at a time: see ``step``

    def __init__(self, config: Cut3rConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        enc, dec = c.enc_embed_dim, c.dec_embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, enc)
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(enc, c.enc_num_heads, c.mlp_ratio, c.norm_eps) for _ in range(c.enc_depth)
        )
        self.enc_norm = nn.LayerNorm(enc, eps=c.norm_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.dec_blocks = nn.ModuleList(
            DecoderBlock(dec, c.dec_num_heads, c.mlp_ratio, c.norm_eps) for _ in range(c.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(dec, eps=c.norm_eps)
        self.register_tokens = nn.Embedding(c.state_size, enc)
        self.decoder_embed_state = nn.Linear(enc, dec)
        self.dec_blocks_state = nn.ModuleList(
            DecoderBlock(dec, c.state_dec_num_heads, c.mlp_ratio, c.norm_eps)
            for _ in range(c.dec_depth)
        )
        self.dec_norm_state = nn.LayerNorm(dec, eps=c.norm_eps)
        self.pose_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.pose_retriever = PoseMemory(c)
        self.skipped_keys: tuple[str, ...] = ()

    @property
    def camera_dim(self) -> int:
        """Width of the camera token (dec_embed_dim)."""
        return self.config.dec_embed_dim

    def init_state(self, batch_size: int = 1) -> Cut3rState:
        """State before the first frame: projected register tokens and the learned memory."""
        state = self.decoder_embed_state(self.register_tokens.weight)[None]
        return Cut3rState(
            state_feat=state.expand(batch_size, -1, -1),
            memory=self.pose_retriever.mem.expand(batch_size, -1, -1),
        )

    def step(self, image: Tensor, state: Cut3rState | None = None) -> tuple[Tensor, Cut3rState]:
        """One frame (B, 3, H, W) in [-1, 1] -> camera token (B, camera_dim) and the next state.

        ``state=None`` (or a state with ``frame_index == 0``) takes the first-frame path.
        """
        p = self.config.patch_size
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] % p or image.shape[3] % p:
            raise InputError(
                f"CUT3R expects images (B, 3, H, W) with H, W multiples of {p}, "
                f"got {tuple(image.shape)}",
                "resize or crop the frames",
            )
        if state is None:
            state = self.init_state(image.shape[0])
        camera, state_feat, memory = self.step_tensors(
            image, state.state_feat, state.memory, first_frame=state.frame_index == 0
        )
        return camera, Cut3rState(state_feat, memory, state.frame_index + 1)

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """Frames (T, 3, H, W), one stream, in order -> camera tokens (T, camera_dim)."""
        if frames.ndim != 4 or len(frames) == 0:
            raise InputError(f"CUT3R encode expects (T>0, 3, H, W), got {tuple(frames.shape)}")
        state = None
        tokens = []
        for frame in frames:
            camera, state = self.step(frame[None], state)
            tokens.append(camera[0])
        return torch.stack(tokens)

    def step_tensors(
        self, image: Tensor, state_feat: Tensor, memory: Tensor, first_frame: bool | Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pure-tensor step for export: (camera token, new state_feat, new memory).

        ``first_frame`` as a Python bool picks the path; as a (B,) tensor of 0/1 it selects
        per item with ``where`` (one exported graph for every frame, no control flow).
        """
        feat, pos = self.encode_images(image)
        return self.decode_step(feat, pos, state_feat, memory, first_frame)

    def encode_images(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The state-independent half of a step: ViT tokens after ``enc_norm`` (B, N, enc_dim)
        and their patch positions (N, 2). Frames of one size can be encoded in one batch."""
        c = self.config
        x, h, w = self.patch_embed(image)
        pos = patch_positions(h, w, device=x.device)
        # float16 tables: CroCo's encoder rounds q and k to float16 before RoPE, even in fp32
        rope = rope_tables(pos, c.enc_embed_dim // c.enc_num_heads, c.rope_freq, torch.float16)
        for blk in self.enc_blocks:
            x = blk(x, rope)
        return self.enc_norm(x), pos

    def decode_step(
        self, feat: Tensor, pos: Tensor, state_feat: Tensor, memory: Tensor, first_frame: bool | Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The recurrent half of a step, from ``encode_images``' output: pose query (the
        pose token on the first frame, a memory read afterwards), two-stream decoder,
        memory write -> (camera token, new state_feat, new memory)."""
        mean_feat = feat.mean(dim=1, keepdim=True)
        first_pose = self.pose_token.expand(feat.shape[0], -1, -1)
        if isinstance(first_frame, Tensor):
            read = self.pose_retriever.read(mean_feat, memory)
            pose = torch.where(first_frame.reshape(-1, 1, 1) > 0.5, first_pose, read)
        elif first_frame:
            pose = first_pose
        else:
            pose = self.pose_retriever.read(mean_feat, memory)
        camera, new_state = self._decode(feat, pos, pose, state_feat)
        new_memory = self.pose_retriever.write(memory, mean_feat, camera)
        return camera[:, 0], new_state, new_memory

    def _decode(
        self, feat: Tensor, pos: Tensor, pose: Tensor, state: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Two-stream decoder -> (dec_norm(pose token) (B, 1, dim), dec_norm_state(state stream)).

        Only the camera token of the image stream is used (the point-map heads are not run),
        so its last block computes the pose token's row alone: the same value, without the
        image rows' queries, cross-attention and MLP of that block.
        """
        c = self.config
        img = torch.cat([pose, self.decoder_embed(feat)], dim=1)
        img_pos = torch.cat([torch.full_like(pos[:1], -1.0), pos])
        state_pos = state_positions(c.state_size, c.state_pe).to(pos.device)
        img_dim = c.dec_embed_dim // c.dec_num_heads
        state_dim = c.dec_embed_dim // c.state_dec_num_heads
        f32 = torch.float32
        rope_img = rope_tables(img_pos, img_dim, c.rope_freq, f32)
        rope_state_in_img = rope_tables(state_pos, img_dim, c.rope_freq, f32)
        rope_state = rope_tables(state_pos, state_dim, c.rope_freq, f32)
        rope_img_in_state = rope_tables(img_pos, state_dim, c.rope_freq, f32)
        last = len(self.dec_blocks) - 1
        for depth, (blk_state, blk_img) in enumerate(zip(self.dec_blocks_state, self.dec_blocks)):
            state, img = (
                blk_state(state, img, rope_state, rope_img_in_state),
                blk_img(img, state, rope_img, rope_state_in_img, queries=1 if depth == last else None),
            )
        return self.dec_norm(img), self.dec_norm_state(state)
