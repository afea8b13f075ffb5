// loc3r-trt-bench ENGINE [ITERATIONS] [name=d0xd1x... ...]
// Loads a serialized TensorRT 10 engine, allocates a device buffer for every I/O tensor
// (dynamic inputs take the shapes given on the command line), and reports the median
// latency of enqueueV3 over ITERATIONS runs after 10 warm-up runs. Inputs are zeros:
// this measures speed, not numerics (parity is checked by loc3r-export in Python).
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << msg << "\n";
  }
};

#define CHECK_CUDA(call)                                                         \
  do {                                                                           \
    cudaError_t err = (call);                                                    \
    if (err != cudaSuccess) {                                                    \
      std::cerr << "loc3r-trt-bench: CUDA error: " << cudaGetErrorString(err) << "\n"; \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

std::vector<char> readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "loc3r-trt-bench: error: cannot read " << path << ": pass an engine built by loc3r-export build\n";
    std::exit(2);
  }
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

nvinfer1::Dims parseDims(const std::string& text) {
  nvinfer1::Dims dims{};
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, 'x')) dims.d[dims.nbDims++] = std::stoll(part);
  return dims;
}

size_t elementSize(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    default: return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: loc3r-trt-bench ENGINE [ITERATIONS] [name=d0xd1x...]...\n";
    return 2;
  }
  int iterations = argc > 2 ? std::atoi(argv[2]) : 50;
  std::map<std::string, nvinfer1::Dims> shapes;
  for (int i = 3; i < argc; ++i) {
    std::string arg = argv[i];
    auto eq = arg.find('=');
    shapes[arg.substr(0, eq)] = parseDims(arg.substr(eq + 1));
  }

  Logger logger;
  auto plan = readFile(argv[1]);
  std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
  std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
  if (!engine) {
    std::cerr << "loc3r-trt-bench: error: " << argv[1]
              << " does not deserialize here (built for another GPU or TensorRT version?): rebuild it on this device\n";
    return 2;
  }
  std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));

  std::vector<void*> buffers;
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT) {
      auto it = shapes.find(name);
      nvinfer1::Dims dims = it != shapes.end() ? it->second : engine->getProfileShape(name, 0, nvinfer1::OptProfileSelector::kOPT);
      context->setInputShape(name, dims);
    }
  }
  for (int i = 0; i < engine->getNbIOTensors(); ++i) {
    const char* name = engine->getIOTensorName(i);
    nvinfer1::Dims dims = context->getTensorShape(name);
    size_t count = 1;
    for (int d = 0; d < dims.nbDims; ++d) count *= static_cast<size_t>(std::max<int64_t>(dims.d[d], 1));
    void* ptr = nullptr;
    size_t bytes = count * elementSize(engine->getTensorDataType(name));
    CHECK_CUDA(cudaMalloc(&ptr, bytes));
    CHECK_CUDA(cudaMemsetAsync(ptr, 0, bytes, stream));
    context->setTensorAddress(name, ptr);
    buffers.push_back(ptr);
  }

  std::vector<double> ms;
  for (int i = 0; i < iterations + 10; ++i) {
    auto start = std::chrono::steady_clock::now();
    if (!context->enqueueV3(stream)) {
      std::cerr << "loc3r-trt-bench: error: enqueueV3 failed\n";
      return 1;
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
    if (i >= 10) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("{\"engine\": \"%s\", \"iterations\": %d, \"median_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f}\n",
              argv[1], iterations, ms[ms.size() / 2], ms.front(), ms.back());
  for (void* ptr : buffers) cudaFree(ptr);
  cudaStreamDestroy(stream);
  return 0;
}
