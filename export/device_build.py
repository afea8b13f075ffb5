"""``loc3r-export build --manifest``: build the TensorRT engines a manifest plans, on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loc3r.errors import InputError
from loc3r.export.manifest import MANIFEST_FILE, Manifest, load_manifest
from loc3r.export.tensorrt_build import Profile, build_engine, cuda_device_sm, import_tensorrt
from loc3r.fileio import write_json_atomic


def build_from_manifest(manifest_path: str | Path, progress: Callable[[str], None] = print) -> Manifest:
    """Build every planned engine next to the manifest and record them in it."""
    path = Path(manifest_path)
    manifest = load_manifest(path.parent if path.name == MANIFEST_FILE else path)
    plan = manifest.data.get("device_build")
    if not plan:
        raise InputError(
            f"{manifest.root / MANIFEST_FILE} plans no TensorRT engines (target {manifest.data['target']['name']})",
            "export for a TensorRT target, e.g. loc3r-export --target jetson-orin",
        )
    trt = import_tensorrt()
    sm = cuda_device_sm()
    if sm != plan["sm"]:
        raise InputError(
            f"the manifest was prepared for sm_{plan['sm']} but this GPU is sm_{sm}",
            "export again with the --target that matches this device",
        )
    version = ".".join(trt.__version__.split(".")[:2])
    if version != plan["trt_version"]:
        progress(f"note: planned for TensorRT {plan['trt_version']}, building with {trt.__version__}")
    built = {}
    for name, engine in plan["engines"].items():
        progress(f"building {engine['engine']} ...")
        profile = Profile({k: tuple(tuple(s) for s in v) for k, v in engine["profile"].items()})
        engine_file = manifest.root / engine["engine"].replace(f"_trt{plan['trt_version']}_", f"_trt{version}_")
        build_engine(
            manifest.root / engine["onnx"],
            engine_file,
            profile,
            fp16=plan["precision"] == "fp16",
            workspace_mib=plan["workspace_mib"] or 1024,
            timing_cache=manifest.root / "timing.cache",
            fp32_ops=tuple(engine["fp32_ops"]),
        )
        built[name] = engine_file.name
    data = dict(manifest.data)
    data["engines"] = {"trt_version": trt.__version__, "sm": sm, "files": built}
    data["device_build"] = {**plan, "status": "built"}
    write_json_atomic(manifest.root / MANIFEST_FILE, data)
    return load_manifest(manifest.root)
