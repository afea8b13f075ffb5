"""``loc3r-export build --manifest``: build the TensorRT engines a manifest plans, on the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loc3r.errors import InputError
from loc3r.export.manifest import MANIFEST_FILE, Manifest, contained, load_manifest, write_manifest
from loc3r.export.tensorrt_build import Profile, build_engine, cuda_device_sm, import_tensorrt
from loc3r.fileio import claim_entries


def build_from_manifest(manifest_path: str | Path, progress: Callable[[str], None] = print) -> Manifest:
    """Build every planned engine next to the manifest (whose files are verified first) and
    record them in it, hashed like every other artifact."""
    path = Path(manifest_path)
    manifest = load_manifest(path.parent if path.name == MANIFEST_FILE else path)
    manifest.verify()
    if not manifest.data.get("device_build"):
        raise InputError(
            f"{manifest.path} plans no TensorRT engines (target {manifest.data['target'].get('name')})",
            "export for a TensorRT target, e.g. loc3r-export --target jetson-orin",
        )
    planned_sm, planned_trt = manifest.value("device_build", "sm"), manifest.value("device_build", "trt_version")
    fp16 = manifest.data["device_build"].get("precision") == "fp16"
    workspace = manifest.data["device_build"].get("workspace_mib") or 1024
    plans = {name: planned_engine(manifest, name) for name in manifest.value("device_build", "engines", kind=dict)}
    trt = import_tensorrt()  # every path is checked before anything is built
    sm = cuda_device_sm()
    if sm != planned_sm:
        raise InputError(
            f"the manifest was prepared for sm_{planned_sm} but this GPU is sm_{sm}",
            "export again with the --target that matches this device",
        )
    version = ".".join(trt.__version__.split(".")[:2])
    if version != planned_trt:
        progress(f"note: planned for TensorRT {planned_trt}, building with {trt.__version__}")
    built = {}
    for name, plan in plans.items():
        progress(f"building {plan.engine} ...")
        engine_name = plan.engine.replace(f"_trt{planned_trt}_", f"_trt{version}_")
        build_engine(
            plan.onnx,
            contained(manifest.root, engine_name, manifest.path),
            plan.profile,
            fp16=fp16,
            workspace_mib=workspace,
            timing_cache=manifest.root / "timing.cache",
            fp32_ops=plan.fp32_ops,
        )
        built[name] = engine_name
    claim_entries(manifest.root, [Path(name).parts[0] for name in built.values()])
    data = dict(manifest.data)
    data["engines"] = {"trt_version": trt.__version__, "sm": sm, "files": built}
    data["device_build"] = {**data["device_build"], "status": "built"}
    data["files"] = {k: v for k, v in manifest.files.items() if k not in built.values()}  # rebuilt: hashed anew
    write_manifest(manifest.root, data)
    return load_manifest(manifest.root)


@dataclass(frozen=True)
class PlannedEngine:
    """One engine the manifest plans: its ONNX input, engine name, profile and FP32 ops."""

    onnx: Path
    engine: str
    profile: Profile
    fp32_ops: tuple[str, ...]


def planned_engine(manifest: Manifest, name: str) -> PlannedEngine:
    """The plan of engine ``name``, its paths checked (inside the folder, the ONNX listed)."""
    engine = manifest.value("device_build", "engines", name, "engine")
    contained(manifest.root, engine, manifest.path)
    shapes = manifest.value("device_build", "engines", name, "profile", kind=dict)
    try:
        profile = Profile({key: tuple(tuple(int(d) for d in s) for s in v) for key, v in shapes.items()})
    except (TypeError, ValueError):
        raise manifest.corrupt(f"the profile of engine {name!r} is malformed") from None
    return PlannedEngine(
        onnx=manifest.file(manifest.value("device_build", "engines", name, "onnx")),
        engine=engine,
        profile=profile,
        fp32_ops=tuple(str(op) for op in manifest.value("device_build", "engines", name, "fp32_ops", kind=list)),
    )
