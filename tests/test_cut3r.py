"""CUT3R camera encoder: config, RoPE, the step/encode API and shapes (tiny random weights)."""

from __future__ import annotations

import pytest
import torch

from loc3r.errors import InputError, ModelError
from loc3r.models.cut3r import Cut3rCameraEncoder, Cut3rConfig, Cut3rState, random_state_dict
from loc3r.models.cut3r.rope import apply_rope, patch_positions, rope_tables, state_positions


@pytest.fixture(scope="module")
def tiny() -> Cut3rCameraEncoder:
    config = Cut3rConfig.tiny()
    model = Cut3rCameraEncoder(config)
    model.load_state_dict(random_state_dict(config, seed=0))
    return model.eval()


def _frames(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((count, 3, height, width), generator=gen) * 2 - 1


@pytest.mark.parametrize(
    "config", [Cut3rConfig.tiny(), Cut3rConfig.real_224_linear(), Cut3rConfig.real_512_dpt()]
)
def test_config_round_trip(config: Cut3rConfig) -> None:
    assert Cut3rConfig.from_dict(config.to_dict()) == config


def test_presets_match_the_reference_configs() -> None:
    real = Cut3rConfig.real_512_dpt()
    assert (real.enc_embed_dim, real.enc_depth, real.enc_num_heads) == (1024, 24, 16)
    assert (real.dec_embed_dim, real.dec_depth, real.dec_num_heads) == (768, 12, 12)
    assert (real.state_size, real.state_dec_num_heads, real.local_mem_size) == (768, 16, 256)
    assert real.mem_dim == 1536 and real.rope_freq == 100.0 and real.state_pe == "2d"
    tiny = Cut3rConfig.tiny()
    for dim in (tiny.enc_embed_dim, tiny.dec_embed_dim):
        assert dim % 64 == 0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ModelError, match="head size"):
        Cut3rConfig(enc_embed_dim=100, enc_num_heads=3)
    with pytest.raises(ModelError, match="unknown CUT3R config fields"):
        Cut3rConfig.from_dict({"bogus": 1})


def test_rope_handles_position_minus_one() -> None:
    pos = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [3.0, 5.0]])
    x = torch.randn(1, 2, 3, 16)
    for dtype in (torch.float32, torch.float16):
        out = apply_rope(x, rope_tables(pos, 16, 100.0, dtype))
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert torch.equal(out[:, :, 1], x[:, :, 1].to(dtype).to(torch.float32))  # position 0
    # angle = pos * inv_freq: -1 rotates by the opposite angle of +1
    plus = apply_rope(x, rope_tables(torch.ones(3, 2), 16, 100.0, torch.float32))
    minus = apply_rope(plus, rope_tables(-torch.ones(3, 2), 16, 100.0, torch.float32))
    torch.testing.assert_close(minus, x, atol=1e-6, rtol=0)


def test_positions() -> None:
    assert patch_positions(2, 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    two_d = state_positions(768, "2d")
    assert two_d[:, 1].max() == 27 and two_d[-1].tolist() == [27, 11]  # width 28
    assert state_positions(9, "2d")[4].tolist() == [1, 0]  # odd width 3 -> 4
    assert state_positions(4, "1d").tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]


def test_step_first_frame_and_state(tiny: Cut3rCameraEncoder) -> None:
    frames = _frames(2, 64, 96)
    with torch.no_grad():
        token, state = tiny.step(frames[:1])
        assert token.shape == (1, tiny.camera_dim) and tiny.camera_dim == 128
        assert state.frame_index == 1
        assert state.state_feat.shape == (1, 16, 128) and state.memory.shape == (1, 8, 256)
        # an explicit initial state takes the same first-frame path as None
        token0, state0 = tiny.step(frames[:1], tiny.init_state(1))
        assert torch.equal(token0, token) and torch.equal(state0.state_feat, state.state_feat)
        token1, state1 = tiny.step(frames[1:], state)
        assert state1.frame_index == 2 and torch.isfinite(token1).all()
        # the second frame reads the pose token from memory instead of pose_token
        as_first, _ = tiny.step(frames[1:], Cut3rState(state.state_feat, state.memory, 0))
        assert not torch.allclose(as_first, token1)


def test_encode_equals_repeated_step(tiny: Cut3rCameraEncoder) -> None:
    frames = _frames(3, 64, 64, seed=1)
    tokens = tiny.encode(frames)
    state = None
    with torch.no_grad():
        for t in range(3):
            token, state = tiny.step(frames[t : t + 1], state)
            assert torch.equal(token[0], tokens[t])


def test_step_tensors_matches_step(tiny: Cut3rCameraEncoder) -> None:
    frames = _frames(2, 32, 48, seed=2)
    with torch.no_grad():
        init = tiny.init_state(1)
        token, state = tiny.step(frames[:1])
        t0, s0, m0 = tiny.step_tensors(frames[:1], init.state_feat, init.memory, first_frame=True)
        assert torch.equal(t0, token) and torch.equal(s0, state.state_feat)
        assert torch.equal(m0, state.memory)
        token, _ = tiny.step(frames[1:], state)
        t1, _, _ = tiny.step_tensors(frames[1:], s0, m0, first_frame=False)
        assert torch.equal(t1, token)


@pytest.mark.parametrize("height,width", [(160, 224), (224, 160), (16, 16)])
def test_non_square_shapes(tiny: Cut3rCameraEncoder, height: int, width: int) -> None:
    tokens = tiny.encode(_frames(2, height, width))
    assert tokens.shape == (2, 128) and torch.isfinite(tokens).all()


def test_batch_matches_single(tiny: Cut3rCameraEncoder) -> None:
    frames = _frames(2, 48, 64, seed=3)
    with torch.no_grad():
        batched, _ = tiny.step(frames)
        for b in range(2):
            single, _ = tiny.step(frames[b : b + 1])
            torch.testing.assert_close(batched[b], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 1, 64, 64), (3, 64, 64)])
def test_bad_image_shape(tiny: Cut3rCameraEncoder, shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match="multiples of 16"):
        tiny.step(torch.zeros(shape))
    with pytest.raises(InputError, match="T>0"):
        tiny.encode(torch.zeros(0, 3, 64, 64))


class _Step(torch.nn.Module):
    def __init__(self, model: Cut3rCameraEncoder, first_frame: bool) -> None:
        super().__init__()
        self.model, self.first_frame = model, first_frame

    def forward(self, image: torch.Tensor, state: torch.Tensor, memory: torch.Tensor) -> tuple:
        return self.model.step_tensors(image, state, memory, self.first_frame)


@pytest.mark.parametrize("first_frame", [True, False])
def test_step_tensors_exports_with_dynamic_size(
    tiny: Cut3rCameraEncoder, first_frame: bool
) -> None:
    """One graph per path, any H, W multiple of 16: no data-dependent control flow."""
    init = tiny.init_state(1)
    args = (_frames(1, 32, 48)[0][None], init.state_feat.contiguous(), init.memory.contiguous())
    h, w = torch.export.Dim("h", min=1, max=64), torch.export.Dim("w", min=1, max=64)
    step = _Step(tiny, first_frame)
    with torch.no_grad():
        dynamic = ({2: 16 * h, 3: 16 * w}, None, None)
        program = torch.export.export(step, args, dynamic_shapes=dynamic)
        other = (_frames(1, 160, 224, seed=4), *args[1:])
        for got, want in zip(program.module()(*other), step(*other)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_tensor_first_frame_flag_selects_the_same_path_as_the_bool() -> None:
    """The exported graph's ``first_frame`` input (1.0 / 0.0) equals the Python-bool paths."""
    torch.manual_seed(0)
    encoder = Cut3rCameraEncoder(Cut3rConfig.tiny()).eval()
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        init = encoder.init_state(1)
        _, state, memory = encoder.step_tensors(image, init.state_feat, init.memory, True)
        for flag, path in ((1.0, True), (0.0, False)):
            by_tensor = encoder.step_tensors(image, state, memory, torch.tensor([flag]))
            by_bool = encoder.step_tensors(image, state, memory, path)
            for a, b in zip(by_tensor, by_bool, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        first, _, _ = encoder.step_tensors(image, state, memory, torch.tensor([1.0]))
        later, _, _ = encoder.step_tensors(image, state, memory, torch.tensor([0.0]))
    assert not torch.allclose(first, later)


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
def test_a_block_computes_only_the_query_rows_asked_for(rope: bool) -> None:
    """``DecoderBlock(..., queries=k)`` returns the first k rows of the full block's output:
    every row still serves as a key and value of its self-attention (1e-6 absolute: only the
    matrix products' shapes differ)."""
    from loc3r.models.cut3r.blocks import DecoderBlock

    torch.manual_seed(0)
    block = DecoderBlock(32, 4, 4.0, 1e-6).eval()
    x, y = torch.randn(2, 9, 32), torch.randn(2, 7, 32)
    tables = (rope_tables(torch.randn(9, 2), 8, 100.0, torch.float32), rope_tables(torch.randn(7, 2), 8, 100.0, torch.float32))
    ropes = tables if rope else (None, None)
    with torch.no_grad():
        full = block(x, y, *ropes)
        for k in (1, 3):
            part = block(x, y, *ropes, queries=k)
            assert part.shape == (2, k, 32)
            torch.testing.assert_close(part, full[:, :k], atol=1e-6, rtol=0)


def test_the_last_image_block_computes_the_camera_token_alone(tiny: Cut3rCameraEncoder) -> None:
    """Only the camera token of the image stream is used, so the decoder's last image block
    runs on that row alone (the image rows' queries, cross-attention and MLP of that block
    are skipped): the camera token and state equal the full decoder's.

    Mutation checked: dropping ``queries=1`` in ``_decode`` returns every image row (the shape
    assertion fails)."""
    from loc3r.models.cut3r.rope import patch_positions as grid

    c = tiny.config
    torch.manual_seed(1)
    feat, pos = torch.randn(1, 12, c.enc_embed_dim), grid(3, 4)
    state = tiny.init_state(1)
    pose = tiny.pose_token
    with torch.no_grad():
        camera, new_state = tiny._decode(feat, pos, pose, state.state_feat)
        tiny_blocks = tiny.dec_blocks
        full_img = torch.cat([pose, tiny.decoder_embed(feat)], dim=1)
        assert camera.shape == (1, 1, c.dec_embed_dim)
        last = tiny_blocks[-1].forward
        try:  # the same decoder with its last block computing every row
            tiny_blocks[-1].forward = lambda *a, queries=None: last(*a)
            everything, same_state = tiny._decode(feat, pos, pose, state.state_feat)
        finally:
            del tiny_blocks[-1].forward
    assert everything.shape == (1, full_img.shape[1], c.dec_embed_dim)
    torch.testing.assert_close(camera, everything[:, :1], atol=1e-6, rtol=0)
    torch.testing.assert_close(new_state, same_state, atol=0, rtol=0)
