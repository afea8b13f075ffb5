"""INT8 encoder graphs for TensorRT targets, calibrated on the user's own frames
(``loc3r-export --target jetson-orin --encoders int8 --calibration VIDEO [VIDEO...]``).

TensorRT 10 deprecates implicit (calibrator) INT8; its route is explicit quantization: a
QDQ graph whose QuantizeLinear/DequantizeLinear pairs carry the scales, symmetric signed
int8, weights per output channel. ONNX Runtime's static quantizer writes that graph
(``QuantFormat.QDQ``, MinMax ranges) from a ``CalibrationDataReader`` fed the frames of
the user's videos, sampled and preprocessed exactly as ``loc3r-run`` does (the CUT3R step
calibrated on the FP32 encoder's outputs and the state it carries through each video).
Every fourth frame is held out: each QDQ graph is run in ONNX Runtime (CPU here) against
its FP32 graph on those frames, the error recorded in the manifest, and past the graph's
``int8_tolerance`` the export fails. ``loc3r-export build`` parses the QDQ graph into the
TensorRT network (unverified on hardware: no GPU here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loc3r.errors import InputError, InternalError
from loc3r.export.int8 import CALIBRATION_FRAMES_PER_VIDEO, int8_path
from loc3r.export.precision import ScaledError, merge_scaled, scaled_error
from loc3r.export.root_logger import kept_root_logger
from loc3r.models.config import Loc3rConfig
from loc3r.runtime.ort import open_session

HOLD_OUT = 4  # every HOLD_OUT-th frame of a video is held out for the error check
MIN_FRAMES = 8  # fewer decoded frames in all cannot calibrate and check
QDQ_FORM = "qdq-static-int8"  # the manifest's name for this form

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class CalibrationSet:
    """The user's frames, per video, preprocessed for each encoder as at run time."""

    videos: tuple[str, ...]
    camera: tuple[tuple[np.ndarray, ...], ...]  # per video: the 3D-encoder input of each frame
    siglip: tuple[tuple[np.ndarray, ...], ...]  # per video: (3, S, S) in [-1, 1]

    @property
    def frames(self) -> int:
        return sum(len(frames) for frames in self.camera)

    def part(self, held_out: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per video, the calibration (or held-out) frames in order, stacked: camera inputs
        (one array per video) and SigLIP inputs (one array per video)."""
        camera, siglip = [], []
        for frames, pixels in zip(self.camera, self.siglip, strict=True):
            keep = [i for i in range(len(frames)) if (i % HOLD_OUT == HOLD_OUT - 1) == held_out]
            camera.append(np.stack([frames[i] for i in keep]))
            siglip.append(np.stack([pixels[i] for i in keep]))
        return camera, siglip

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the set (file names only, not the paths)."""
        held = sum(len(c) for c in self.part(held_out=True)[0])
        return {"videos": [Path(v).name for v in self.videos], "frames": self.frames, "held_out_frames": held, "method": "minmax"}


def read_calibration(videos: Sequence[str | Path], config: Loc3rConfig) -> CalibrationSet:
    """Sample ``CALIBRATION_FRAMES_PER_VIDEO`` frames of each video and preprocess them as ``loc3r-run``
    does; one-line :class:`InputError` for an unreadable video or too few frames."""
    from loc3r.runtime.preprocess import camera_pixels, siglip_pixels
    from loc3r.runtime.video import iter_frames

    camera, siglip = [], []
    for video in videos:
        if not Path(video).is_file():
            raise InputError(f"--calibration {video}: no such file", "give videos of the scenes you will ask about")
        try:
            sampled = list(iter_frames(video, CALIBRATION_FRAMES_PER_VIDEO))
        except InputError as exc:
            problem = exc.problem.removeprefix(f"{video}: ")
            raise InputError(f"--calibration {video}: {problem}", "give readable videos (mp4, mov, mkv, avi)") from None
        frames = list({frame.index: frame for frame in sampled}.values())  # a short video's repeated samples count once
        if len(frames) < HOLD_OUT:
            raise InputError(
                f"--calibration {video}: {len(frames)} distinct frame(s) decoded, at least {HOLD_OUT} per video are needed",
                "give longer videos",
            )
        camera.append(tuple(camera_pixels(frame, config) for frame in frames))
        siglip.append(tuple(siglip_pixels([frame], config.vision.image_size)[0] for frame in frames))
    calibration = CalibrationSet(tuple(str(v) for v in videos), tuple(camera), tuple(siglip))
    if calibration.frames < MIN_FRAMES:
        raise InputError(
            f"--calibration: {calibration.frames} frames decoded from {len(videos)} video(s), at least {MIN_FRAMES} are needed",
            "give longer videos, or more of them",
        )
    return calibration


class FeedReader:
    """ONNX Runtime's ``CalibrationDataReader`` over a list of feeds (duck-typed: it only
    calls ``get_next`` and ``rewind``)."""

    def __init__(self, feeds: list[Feeds]) -> None:
        self.feeds = feeds
        self._next = 0

    def get_next(self) -> Feeds | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def write_qdq(onnx_file: Path, feeds: list[Feeds]) -> Path:
    """``graph.int8.onnx`` beside ``graph.onnx``: the QDQ graph TensorRT's explicit
    quantization takes (symmetric signed int8 activations and weights, weights per output
    channel; MatMuls with a constant weight, Gemm and Conv), ranges from ``feeds``."""
    path = int8_path(onnx_file)
    with kept_root_logger(logging.ERROR):  # the quantizer configures and logs to the root logger
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        quantize_static(
            onnx_file,
            path,
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True},
        )
    return path


def qdq_entry(name: str, path: Path, error: ScaledError, calibration: CalibrationSet) -> dict[str, Any]:
    """The manifest's ``int8`` entry of graph ``name``; past its tolerance the export fails."""
    if not error.within_tolerance:
        raise InternalError(
            f"{name}: the calibrated INT8 graph is {error.relative:.3g} of the output scale away from FP32 on the held-out "
            f"calibration frames (tolerance {error.tolerance:g})",
            "calibrate on more frames like your videos (--calibration), or export without --encoders int8 (FP16 engines)",
        )
    return {"file": path.name, "form": QDQ_FORM, "calibration": calibration.describe(), "error_vs_fp32": error.to_dict()}


def calibrate_vision(path: Path, calibration: CalibrationSet, tolerance: float) -> dict[str, Any]:
    """The vision graph's QDQ form: calibrated frame by frame, checked on the held-out frames."""
    calibrate = [frame[None] for video in calibration.part(held_out=False)[1] for frame in video]
    qdq = write_qdq(path, [{"pixels": pixels} for pixels in calibrate])
    fp32, int8 = open_session(path), open_session(qdq)
    errors = [
        scaled_error(fp32.run(None, {"pixels": pixels}), int8.run(None, {"pixels": pixels}), tolerance)
        for pixels in calibration.part(held_out=True)[1]
    ]
    return qdq_entry("vision", qdq, merge_scaled(errors), calibration)


def calibrate_cut3r(
    paths: tuple[Path, Path], calibration: CalibrationSet, init: tuple[np.ndarray, np.ndarray], tolerances: tuple[float, float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """CUT3R's encoder and step in QDQ form: the encoder calibrated on the frames, the step on
    the FP32 encoder's outputs and the state the FP32 step carries through each video; both
    checked as they run, over each video's held-out frames, each side on its own state."""
    from loc3r.export.camera_parity import SessionRunner, run_recurrence
    fp32 = SessionRunner(open_session(paths[0]), open_session(paths[1]))
    videos, _ = calibration.part(held_out=False)
    encoder_feeds = [{"image": frame[None]} for images in videos for frame in images]
    step_feeds = []
    names = [value.name for value in fp32.step_graph.get_inputs()]
    for images in videos:
        recurrence = run_recurrence(fp32, images, *init)
        features, positions = recurrence.encoded
        state, memory = init
        for frame, outputs in enumerate(recurrence.steps):
            first = np.array([1.0 if frame == 0 else 0.0], dtype=np.float32)
            step_feeds.append(dict(zip(names, (features[frame : frame + 1], positions, state, memory, first), strict=True)))
            _, state, memory = outputs
    qdq = (write_qdq(paths[0], encoder_feeds), write_qdq(paths[1], step_feeds))
    int8 = SessionRunner(open_session(qdq[0]), open_session(qdq[1]))
    encoder_errors, step_errors = [], []
    for images in calibration.part(held_out=True)[0]:
        want, got = run_recurrence(fp32, images, *init), run_recurrence(int8, images, *init)
        encoder_errors.append(scaled_error(want.encoded[:1], got.encoded[:1], tolerances[0]))
        step_errors += [scaled_error(w, g, tolerances[1]) for w, g in zip(want.steps, got.steps, strict=True)]
    return (
        qdq_entry("cut3r_encoder", qdq[0], merge_scaled(encoder_errors), calibration),
        qdq_entry("cut3r_step", qdq[1], merge_scaled(step_errors), calibration),
    )
