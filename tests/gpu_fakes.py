"""Fakes of the GPU libraries, close enough to the real APIs that loc3r's TensorRT path runs
on them end to end: ``tensorrt`` (10.x or 11 surface), cuda-python's runtime, and an
onnxruntime-gpu whose providers are reported but which computes on the CPU.

What they model, and where it comes from (public API docs; never a real GPU here):
- cuda-python: every call returns ``(error, *values)``; device memory is bytes addressed
  by integer pointers (offsets into an allocation allowed); stream capture records the
  work instead of running it, a graph launch replays it.
- TensorRT: named I/O tensors; one active optimisation profile per context;
  ``set_input_shape`` returns False outside it; ``execute_async_v3`` needs every address
  and, for USER_MANAGED contexts, the activation memory; the ONNX parser makes one layer
  per ONNX node with the node's output tensor names (our model of the parser; real
  parsers may add internal layers). The engine computes with ONNX Runtime on the bytes in
  fake device memory; FP16 modes round outputs to float16.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

OK = "cudaSuccess"

# -- cuda-python ------------------------------------------------------------------------------


class FakeCudart(types.ModuleType):
    """``cuda.bindings.runtime`` over host memory; ``calls`` records every function called."""

    class cudaError_t(enum.Enum):  # noqa: N801 - cuda-python's names
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.Enum):  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    class cudaStreamCaptureMode(enum.Enum):  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1

    cudaStreamNonBlocking = 1

    def __init__(self, name: str = "Orin", sm: tuple[int, int] = (8, 7), total: int = 64 << 30, free: int = 48 << 30, devices: int = 1) -> None:
        super().__init__("cuda.bindings.runtime")
        self.props = types.SimpleNamespace(name=name.encode() + b"\0" * 8, major=sm[0], minor=sm[1], totalGlobalMem=total)
        self.free, self.total, self.devices = free, total, devices
        self.runtime_version = 12060  # CUDA 12.6, as cudaRuntimeGetVersion encodes it
        self.memory: dict[int, bytearray] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.capturing: list[Any] | None = None
        self.launches = 0
        self._next = 1 << 20

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name.startswith("cuda") and callable(value) and not isinstance(value, type):
            calls = super().__getattribute__("calls")

            def logged(*args: Any) -> Any:
                calls.append((name, args))
                return value(*args)

            return logged
        return value

    def ok(self, *values: Any) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess, *values)

    # device
    def cudaGetDeviceCount(self) -> tuple:  # noqa: N802
        return self.ok(self.devices)

    def cudaGetDeviceProperties(self, device: int) -> tuple:  # noqa: N802
        return self.ok(self.props)

    def cudaMemGetInfo(self) -> tuple:  # noqa: N802
        return self.ok(self.free, self.total)

    def cudaRuntimeGetVersion(self) -> tuple:  # noqa: N802
        return self.ok(self.runtime_version)

    # memory
    def cudaMalloc(self, nbytes: int) -> tuple:  # noqa: N802
        pointer = self._next
        self._next += (nbytes + 0xFFFF) & ~0xFFFF
        self.memory[pointer] = bytearray(nbytes)
        return self.ok(pointer)

    def cudaFree(self, pointer: int) -> tuple:  # noqa: N802
        del self.memory[pointer]
        return self.ok()

    def view(self, pointer: int, nbytes: int) -> memoryview:
        """The ``nbytes`` of device memory at ``pointer`` (inside one allocation)."""
        for base, block in self.memory.items():
            if base <= pointer and pointer + nbytes <= base + len(block):
                return memoryview(block)[pointer - base : pointer - base + nbytes]
        raise AssertionError(f"device access out of bounds: {pointer:#x} + {nbytes}")

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> tuple:  # noqa: N802
        def copy() -> None:
            if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
                self.view(dst, nbytes)[:] = ctypes.string_at(src, nbytes)
            elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
                ctypes.memmove(dst, bytes(self.view(src, nbytes)), nbytes)
            else:
                self.view(dst, nbytes)[:] = bytes(self.view(src, nbytes))

        if self.capturing is not None:
            assert kind == self.cudaMemcpyKind.cudaMemcpyDeviceToDevice, "host copies cannot be captured"
            self.capturing.append(copy)
        else:
            copy()
        return self.ok()

    # streams and graphs
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple:  # noqa: N802
        return self.ok(7)

    def cudaStreamSynchronize(self, stream: Any) -> tuple:  # noqa: N802
        return self.ok()

    def cudaStreamDestroy(self, stream: Any) -> tuple:  # noqa: N802
        return self.ok()

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple:  # noqa: N802
        self.capturing = []
        return self.ok()

    def cudaStreamEndCapture(self, stream: Any) -> tuple:  # noqa: N802
        graph, self.capturing = self.capturing, None
        return self.ok(graph)

    def cudaGraphInstantiate(self, graph: list[Any], flags: int) -> tuple:  # noqa: N802
        return self.ok(list(graph))

    def cudaGraphLaunch(self, graph_exec: list[Any], stream: Any) -> tuple:  # noqa: N802
        self.launches += 1
        for work in graph_exec:
            work()
        return self.ok()

    def cudaGraphDestroy(self, graph: Any) -> tuple:  # noqa: N802
        return self.ok()

    def cudaGraphExecDestroy(self, graph_exec: Any) -> tuple:  # noqa: N802
        return self.ok()

    def count(self, function: str) -> int:
        return sum(1 for name, _ in self.calls if name == function)


def install_cudart(monkeypatch: Any, cudart: FakeCudart) -> FakeCudart:
    """Make ``from cuda.bindings import runtime`` return ``cudart``."""
    import sys

    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return cudart


# -- TensorRT ---------------------------------------------------------------------------------


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    INT64 = 8


ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.INT64: DataType.INT64,
    onnx.TensorProto.BOOL: DataType.BOOL,
}
LayerType = enum.Enum(
    "LayerType",
    "NORMALIZATION SOFTMAX REDUCE UNARY ELEMENTWISE CAST SHAPE CONSTANT ASSERTION MATRIX_MULTIPLY CONVOLUTION SHUFFLE "
    "CONCATENATION GATHER SLICE FILL SELECT ACTIVATION OTHER",
)
UnaryOperation = enum.Enum("UnaryOperation", "SQRT SIN COS EXP NEG ERF RECIP ABS")
ElementWiseOperation = enum.Enum("ElementWiseOperation", "SUM PROD SUB DIV POW MAX MIN EQUAL")
ReduceOperation = enum.Enum("ReduceOperation", "AVG SUM MAX MIN")
#: our model of the ONNX parser: op type -> (layer type, operation)
PARSED = {
    "LayerNormalization": (LayerType.NORMALIZATION, None),
    "Softmax": (LayerType.SOFTMAX, None),
    "ReduceMean": (LayerType.REDUCE, ReduceOperation.AVG),
    "ReduceSum": (LayerType.REDUCE, ReduceOperation.SUM),
    "Pow": (LayerType.ELEMENTWISE, ElementWiseOperation.POW),
    "Add": (LayerType.ELEMENTWISE, ElementWiseOperation.SUM),
    "Sub": (LayerType.ELEMENTWISE, ElementWiseOperation.SUB),
    "Mul": (LayerType.ELEMENTWISE, ElementWiseOperation.PROD),
    "Div": (LayerType.ELEMENTWISE, ElementWiseOperation.DIV),
    "Sqrt": (LayerType.UNARY, UnaryOperation.SQRT),
    "Sin": (LayerType.UNARY, UnaryOperation.SIN),
    "Cos": (LayerType.UNARY, UnaryOperation.COS),
    "Exp": (LayerType.UNARY, UnaryOperation.EXP),
    "Neg": (LayerType.UNARY, UnaryOperation.NEG),
    "Erf": (LayerType.UNARY, UnaryOperation.ERF),
    "Cast": (LayerType.CAST, None),
    "Shape": (LayerType.SHAPE, None),
    "Constant": (LayerType.CONSTANT, None),
    "MatMul": (LayerType.MATRIX_MULTIPLY, None),
    "Gemm": (LayerType.MATRIX_MULTIPLY, None),
    "Conv": (LayerType.CONVOLUTION, None),
    "Reshape": (LayerType.SHUFFLE, None),
    "Transpose": (LayerType.SHUFFLE, None),
    "Concat": (LayerType.CONCATENATION, None),
    "Gather": (LayerType.GATHER, None),
    "Slice": (LayerType.SLICE, None),
    "Range": (LayerType.FILL, None),
    "Where": (LayerType.SELECT, None),
}


@dataclass
class FakeTensor:
    name: str
    dtype: DataType


class ILayer:
    def __init__(self, name: str, kind: LayerType, op: Any, outputs: list[FakeTensor]) -> None:
        self.name, self.type, self._op, self._outputs = name, kind, op, outputs
        self.precision: Any = None
        self.output_types: dict[int, Any] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> FakeTensor:
        return self._outputs[index]

    def set_output_type(self, index: int, dtype: Any) -> None:
        self.output_types[index] = dtype


class _WithOp(ILayer):
    @property
    def op(self) -> Any:
        return self._op


class IUnaryLayer(_WithOp):
    pass


class IElementWiseLayer(_WithOp):
    pass


class IReduceLayer(_WithOp):
    pass


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.layers: list[ILayer] = []
        self.onnx_file: str | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> ILayer:
        return self.layers[index]


class FakeParser:
    def __init__(self, network: FakeNetwork, logger: Any) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        types_ = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
        for node in model.graph.node:
            kind, op = PARSED.get(node.op_type, (LayerType.OTHER, None))
            outputs = [FakeTensor(name, ONNX_TO_TRT.get(types_.get(name, onnx.TensorProto.FLOAT), DataType.FLOAT)) for name in node.output]
            self.network.layers.append(ILayer(node.name, kind, op, outputs))
        self.network.onnx_file = path
        return True


class FakeConfig:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.flags: set[Any] = set()
        self.profiles: list[dict[str, tuple]] = []
        self.pool: dict[Any, int] = {}
        self.timing = b""

    def set_memory_pool_limit(self, pool: Any, nbytes: int) -> None:
        self.pool[pool] = nbytes

    def create_timing_cache(self, data: bytes) -> bytes:
        return data or b"timing"

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        self.timing = cache
        return True

    def get_timing_cache(self) -> Any:
        return types.SimpleNamespace(serialize=lambda: self.timing + b"+")

    def set_flag(self, flag: Any) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class FakeBuilder:
    def __init__(self, trt: FakeTensorRT, logger: Any) -> None:
        if not trt.gpu:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.trt = trt

    def create_network(self, flags: int) -> FakeNetwork:
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        return FakeConfig(self.trt)

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        strong = bool(network.flags & (1 << self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED.value))
        fp16 = strong or self.trt.BuilderFlag.FP16 in config.flags if hasattr(self.trt.BuilderFlag, "FP16") else strong
        pinned = [layer.name for layer in network.layers if layer.precision is not None]
        self.trt.built.append({"network": network, "config": config, "strong": strong, "pinned": pinned})
        plan = {"onnx": network.onnx_file, "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in config.profiles], "fp16": fp16}
        return json.dumps(plan).encode()


class FakeEngine:
    """An engine as TensorRT shows it; computes with ONNX Runtime on fake device memory."""

    def __init__(self, trt: FakeTensorRT, plan: dict[str, Any]) -> None:
        self.trt = trt
        self.session = onnxruntime.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.fp16 = plan["fp16"]
        self.io = [(v.name, "in", v.shape) for v in self.session.get_inputs()] + [(v.name, "out", v.shape) for v in self.session.get_outputs()]
        self.profile_shapes = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in plan["profiles"]] or [{}]
        self.device_memory_size_v2 = 1 << 20
        if trt.version_tuple < (10, 1):
            self.device_memory_size = self.device_memory_size_v2
            del self.device_memory_size_v2

    num_io_tensors = property(lambda self: len(self.io))
    num_optimization_profiles = property(lambda self: len(self.profile_shapes))

    def get_tensor_name(self, index: int) -> str:
        return self.io[index][0]

    def get_tensor_mode(self, name: str) -> Any:
        return {"in": self.trt.TensorIOMode.INPUT, "out": self.trt.TensorIOMode.OUTPUT}[self._io(name)[1]]

    def get_tensor_dtype(self, name: str) -> Any:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self._io(name)[2])

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        return list(self.profile_shapes[index][name])

    def create_execution_context(self, strategy: Any) -> FakeContext:
        return FakeContext(self, strategy)

    def _io(self, name: str) -> tuple[str, str, Any]:
        return next(entry for entry in self.io if entry[0] == name)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: Any) -> None:
        self.engine, self.strategy = engine, strategy
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.runs = 0
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        self.shapes = {}
        return 0 <= index < len(self.engine.profile_shapes)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        bounds = self.engine.profile_shapes[self.profile].get(name)
        fixed = self.engine.get_tensor_shape(name)
        if bounds is None:
            if tuple(shape) != fixed:
                return False
        elif not all(lo <= d <= hi for lo, d, hi in zip(bounds[0], shape, bounds[2])) or len(shape) != len(bounds[0]):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def set_device_memory(self, pointer: int, nbytes: int) -> None:
        self.memory = (pointer, nbytes)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == self.engine.trt.TensorIOMode.INPUT:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        key = tuple(sorted(self.shapes.items()))
        if key not in self._output_shapes:
            feeds = {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}
            outs = self.engine.session.run(None, feeds)
            self._output_shapes[key] = {v.name: o.shape for v, o in zip(self.engine.session.get_outputs(), outs)}
        return self._output_shapes[key][name]

    def execute_async_v3(self, stream: int) -> bool:
        cudart = self.engine.trt.cudart
        assert self.memory is not None, "USER_MANAGED context run without activation memory"
        inputs = [v.name for v in self.engine.session.get_inputs()]
        assert set(inputs) <= set(self.shapes), f"input shapes not set: {set(inputs) - set(self.shapes)}"

        def run() -> None:
            feeds = {}
            for name in inputs:
                shape = self.shapes[name]
                raw = cudart.view(self.addresses[name], 4 * int(np.prod(shape)))
                feeds[name] = np.frombuffer(bytes(raw), np.float32).reshape(shape)
            outs = self.engine.session.run(None, feeds)
            for value, out in zip(self.engine.session.get_outputs(), outs):
                out = out.astype(np.float16).astype(np.float32) if self.engine.fp16 else out.astype(np.float32)
                cudart.view(self.addresses[value.name], out.nbytes)[:] = out.tobytes()
            self.runs += 1

        if cudart.capturing is not None:
            cudart.capturing.append(run)
        else:
            run()
        return True


class FakeRuntime:
    def __init__(self, trt: FakeTensorRT, logger: Any) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
        try:
            return FakeEngine(self.trt, json.loads(data))
        except (ValueError, KeyError):
            return None


class FakeTensorRT(types.ModuleType):
    """``tensorrt`` at a given version; ``built`` records every build's network and config."""

    float32 = DataType.FLOAT
    float16 = DataType.HALF
    DataType = DataType
    LayerType = LayerType
    UnaryOperation = UnaryOperation
    ElementWiseOperation = ElementWiseOperation
    ReduceOperation = ReduceOperation
    ILayer = ILayer
    IUnaryLayer = IUnaryLayer
    IElementWiseLayer = IElementWiseLayer
    IReduceLayer = IReduceLayer
    TensorIOMode = enum.Enum("TensorIOMode", "INPUT OUTPUT")
    MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})
    ExecutionContextAllocationStrategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")

    def __init__(self, version: str, cudart: FakeCudart | None = None, gpu: bool = True) -> None:
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch probes find_spec("tensorrt")
        self.__version__ = version
        self.version_tuple = tuple(int(v) for v in version.split(".")[:2])
        self.cudart, self.gpu = cudart, gpu
        self.built: list[dict[str, Any]] = []
        # TensorRT 11 removed the weak-typing flags (any use is an AttributeError, as there)
        names = "FP16 OBEY_PRECISION_CONSTRAINTS TF32" if self.version_tuple < (11, 0) else "TF32"
        self.BuilderFlag = enum.Enum("BuilderFlag", names)
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=2: None})

    def Builder(self, logger: Any) -> FakeBuilder:  # noqa: N802
        return FakeBuilder(self, logger)

    def OnnxParser(self, network: FakeNetwork, logger: Any) -> FakeParser:  # noqa: N802
        return FakeParser(network, logger)

    def Runtime(self, logger: Any) -> FakeRuntime:  # noqa: N802
        return FakeRuntime(self, logger)


# -- onnxruntime-gpu ----------------------------------------------------------------------------


@dataclass
class FakeGpuOnnxRuntime:
    """Patches onnxruntime to report GPU providers; sessions compute on the CPU, and their
    profiles say the compute ran where ``placed_on`` says (``None``: where it really ran)."""

    providers: list[str] = field(default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    placed_on: str | None = "CUDAExecutionProvider"
    sessions: list[tuple[str, list[Any]]] = field(default_factory=list)
    #: None: libnvinfer loads; else why it does not: the TensorRT EP is listed but a session
    #: asking for it falls back without it (as onnxruntime-gpu does with pip's TensorRT)
    nvinfer_missing: str | None = None
    #: what the TensorRT EP's FP16 does to a session's float outputs (1.0: nothing)
    trt_output_scale: float = 1.0

    def install(self, monkeypatch: Any) -> FakeGpuOnnxRuntime:
        from loc3r.runtime import ort

        real = onnxruntime.InferenceSession
        fake = self
        monkeypatch.setattr(ort, "nvinfer_error", lambda major=10: self.nvinfer_missing)

        class Session(real):  # type: ignore[misc, valid-type]
            def __init__(self, path: str, options: Any = None, providers: list[Any] | None = None) -> None:
                fake.sessions.append((str(path), list(providers or [])))
                asked = [p if isinstance(p, str) else p[0] for p in providers or []]
                self._asked = [p for p in asked if not (p == "TensorrtExecutionProvider" and fake.nvinfer_missing)]
                super().__init__(path, options, providers=["CPUExecutionProvider"])

            def get_providers(self) -> list[str]:
                return [*self._asked, "CPUExecutionProvider"]

            def run(self, names: Any, feeds: Any, *args: Any) -> list[Any]:
                outputs = super().run(names, feeds, *args)
                if "TensorrtExecutionProvider" in self._asked and fake.trt_output_scale != 1.0:
                    outputs = [o * fake.trt_output_scale if o.dtype.kind == "f" else o for o in outputs]
                return outputs

            def end_profiling(self) -> str:
                path = super().end_profiling()
                if fake.placed_on:
                    events = json.loads(Path(path).read_text())
                    for event in events:
                        if event.get("cat") == "Node" and "provider" in event.get("args", {}):
                            event["args"]["provider"] = fake.placed_on
                    Path(path).write_text(json.dumps(events))
                return path

        monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(self.providers))
        return self
