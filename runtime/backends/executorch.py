"""The `executorch` target on ExecuTorch's C++ runtime, without torch.

ExecuTorch's Python bindings (`executorch.extension.pybindings`) cannot run without torch: the
`portable_lib` wrapper imports torch, and its `_C` extension, although it imports with torch
blocked, accepts only `torch.Tensor` inputs (numpy arrays, buffers and DLPack objects are refused
with "Unsupported python type") and returns torch tensors; `executorch.runtime.Runtime` goes
through the same extension. The wheel's C++ runtime libraries (`libexecutorch*.so`) do not
depend on torch, and the wheel ships their headers, so this backend drives them through a tiny C
shim (below) built once with the system C++ compiler and cached, called via ctypes
with numpy arrays. Set EDGETL_ET_SHIM to a prebuilt shim to skip the build (e.g. on a device).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, EdgeRuntimeError, InputError
from ..lora_merge import merged_weights
from ..programs import check_positional_programs
from ..targets import X
from .base import HostStateBackend, Resident, threads_from_env
from .executorch_q8 import is_packed, unpack, unpacked_size

_SHIM_SOURCE = r"""
#include <dlfcn.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/core/data_loader.h>
#include <executorch/extension/memory_allocator/malloc_memory_allocator.h>
#include <executorch/runtime/executor/method.h>
#include <executorch/runtime/executor/program.h>
#include <executorch/runtime/platform/runtime.h>

using namespace executorch::runtime;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::aten::TensorImpl;
using executorch::extension::MallocMemoryAllocator;

namespace {
thread_local std::string g_err;
int fail(const std::string& msg) { g_err = msg; return -1; }

// Reads the caller's buffer (which must outlive it) and counts, per loaded range, the loads
// ExecuTorch still holds. What it has freed (a delegate's blob once the backend is initialized,
// the weights XNNPACK has packed into its own storage) it promises not to read again, so
// `release` can return those pages to the system.
class CountingLoader final : public DataLoader {
 public:
  CountingLoader(const void* data, size_t size) : data_(static_cast<const uint8_t*>(data)), size_(size) {}

  Result<FreeableBuffer> load(size_t offset, size_t size, const SegmentInfo&) const override {
    if (offset > size_ || size > size_ - offset) return Error::InvalidArgument;
    std::lock_guard<std::mutex> g(mu_);
    ++held_[{offset, size}];
    return FreeableBuffer(data_ + offset, size, &CountingLoader::on_free, const_cast<CountingLoader*>(this));
  }

  Error load_into(size_t offset, size_t size, const SegmentInfo&, void* buffer) const override {
    if (buffer == nullptr || offset > size_ || size > size_ - offset) return Error::InvalidArgument;
    std::memcpy(buffer, data_ + offset, size);
    return Error::Ok;
  }

  Result<size_t> size() const override { return size_; }

  // Drops (MADV_DONTNEED) the whole pages that only freed loads covered; returns their bytes.
  // Only for a private anonymous mapping: those pages then read as zeros.
  size_t release() const {
    std::lock_guard<std::mutex> g(mu_);
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const uintptr_t base = (uintptr_t)data_;
    std::vector<std::pair<uintptr_t, uintptr_t>> freed, held;  // absolute [start, end)
    for (const auto& [range, n] : held_) {
      uintptr_t a = base + range.first, b = a + range.second;
      (n > 0 ? held : freed).emplace_back(a, b);
    }
    for (auto& [a, b] : held) a = a / page * page, b = (b + page - 1) / page * page;
    std::sort(freed.begin(), freed.end());  // overlapping freed ranges merged: each page counted once
    std::vector<std::pair<uintptr_t, uintptr_t>> merged;
    for (auto [a, b] : freed) {
      if (!merged.empty() && a <= merged.back().second) merged.back().second = std::max(merged.back().second, b);
      else merged.emplace_back(a, b);
    }
    freed.swap(merged);
    size_t released = 0;
    for (auto [a, b] : freed) {
      uintptr_t pos = (a + page - 1) / page * page, stop = b / page * page;
      while (pos < stop) {  // the freed pages between held ones
        uintptr_t end = stop;
        bool inside = false;
        for (auto [ha, hb] : held) {
          if (ha <= pos && pos < hb) { pos = hb; inside = true; break; }
          if (pos < ha && ha < end) end = ha;
        }
        if (inside) continue;
        if (madvise((void*)pos, end - pos, MADV_DONTNEED) == 0) released += end - pos;
        pos = end;
      }
    }
    held_.clear();  // each page at most once; nothing is loaded after the method is
    return released;
  }

 private:
  static void on_free(void* ctx, void* data, size_t size) {
    auto* self = static_cast<CountingLoader*>(ctx);
    std::lock_guard<std::mutex> g(self->mu_);
    auto it = self->held_.find({(size_t)((const uint8_t*)data - self->data_), size});
    if (it != self->held_.end() && it->second > 0) --it->second;
  }

  const uint8_t* const data_;
  const size_t size_;
  mutable std::mutex mu_;
  mutable std::map<std::pair<size_t, size_t>, int> held_;  // (offset, size) -> loads not yet freed
};

struct Handle {
  std::unique_ptr<CountingLoader> loader;
  std::unique_ptr<Program> program;
  MallocMemoryAllocator method_alloc;
  MallocMemoryAllocator temp_alloc;
  std::vector<std::unique_ptr<uint8_t[]>> planned;  // the method's memory plan, one arena per id
  std::vector<Span<uint8_t>> spans;
  std::unique_ptr<HierarchicalAllocator> planned_memory;
  std::unique_ptr<MemoryManager> memory;
  std::unique_ptr<Method> method;
  size_t planned_bytes = 0;
  std::vector<void*> runtimes;  // the XNNPACK runtimes its delegates created, until etl_presize
};

thread_local std::vector<void*>* t_created = nullptr;  // where xnn_create_runtime_v4 records, while a method loads
std::mutex g_live_mu;
int g_live = 0;  // methods loaded and not closed: their XNNPACK runtimes hold the pool they were created with
}  // namespace

// ExecuTorch's thread pool (libexecutorch_threadpool; the wheel ships no header for it): the pool
// XNNPACK's runtimes and the optimized kernels' parallel_for run on. Only what is called here.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

// XNNPACK's, called by ExecuTorch's XNNPACK backend through its PLT, so this definition (first in the
// lookup scope of the libraries this shim loads) sees every runtime a delegate creates, and forwards.
extern "C" int xnn_reshape_runtime(void* runtime);
extern "C" __attribute__((visibility("default"))) int xnn_create_runtime_v4(
    void* subgraph, void* weights_cache, void* workspace, void* threadpool, uint32_t flags, void** out) {
  using Fn = int (*)(void*, void*, void*, void*, uint32_t, void**);
  static Fn real = (Fn)dlsym(RTLD_NEXT, "xnn_create_runtime_v4");
  if (real == nullptr) return 2;  // xnn_status_invalid_parameter
  int status = real(subgraph, weights_cache, workspace, threadpool, flags, out);
  if (status == 0 && t_created != nullptr && out != nullptr && *out != nullptr) t_created->push_back(*out);
  return status;
}

extern "C" {
const char* etl_last_error() { return g_err.c_str(); }

void* etl_open(const void* data, size_t size, const char* name) {
  runtime_init();
  auto h = std::make_unique<Handle>();
  h->loader = std::make_unique<CountingLoader>(data, size);
  auto program = Program::load(h->loader.get(), Program::Verification::InternalConsistency);
  if (!program.ok()) {
    fail("cannot load the program (error " + std::to_string((int)program.error()) + ")");
    return nullptr;
  }
  h->program = std::make_unique<Program>(std::move(program.get()));
  auto meta = h->program->method_meta(name);
  if (!meta.ok()) { fail(std::string("the program has no method '") + name + "'"); return nullptr; }
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    size_t n = (size_t)meta->memory_planned_buffer_size(i).get();
    h->planned.emplace_back(new uint8_t[n ? n : 1]);
    h->spans.emplace_back(h->planned.back().get(), n);
    h->planned_bytes += n;
  }
  h->planned_memory = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(h->spans.data(), h->spans.size()));
  h->memory = std::make_unique<MemoryManager>(&h->method_alloc, h->planned_memory.get(), &h->temp_alloc);
  t_created = &h->runtimes;
  auto method = h->program->load_method(name, h->memory.get());
  t_created = nullptr;
  if (!method.ok()) { fail("cannot load method (error " + std::to_string((int)method.error()) + ")"); return nullptr; }
  h->method = std::make_unique<Method>(std::move(method.get()));
  std::lock_guard<std::mutex> g(g_live_mu);
  ++g_live;
  return h.release();
}

// XNNPACK's workspace sharing (0: one workspace per delegate call, 1: per program, 2: all programs);
// mode < 0 only reads it. Returns the mode in effect, or -1 (see etl_last_error).
int etl_xnnpack_sharing(int mode) {
  runtime_init();
  if (mode >= 0) {
    BackendOptions<1> set;
    set.set_option("workspace_sharing_mode", mode);
    Error e = set_option("XnnpackBackend", set.view());
    if (e != Error::Ok) return fail("XNNPACK refused workspace_sharing_mode " + std::to_string(mode));
  }
  BackendOptions<1> get;
  get.set_option("workspace_sharing_mode", -1);
  if (get_option("XnnpackBackend", get.view()) != Error::Ok) return fail("cannot read XNNPACK's options");
  const int* v = std::get_if<int>(&get.view()[0].value);
  return v ? *v : fail("XNNPACK's workspace_sharing_mode is not an integer");
}

// XNNPACK's weight cache (packed weights shared by every delegate call and program that packs the
// same constant); enable < 0 only reads it. Returns 0 or 1, or -1 (see etl_last_error).
int etl_xnnpack_weight_cache(int enable) {
  runtime_init();
  if (enable >= 0) {
    BackendOptions<1> set;
    set.set_option("weight_cache_enabled", enable != 0);
    if (set_option("XnnpackBackend", set.view()) != Error::Ok) return fail("XNNPACK refused weight_cache_enabled");
  }
  BackendOptions<1> get;
  get.set_option("weight_cache_enabled", false);
  if (get_option("XnnpackBackend", get.view()) != Error::Ok) return fail("cannot read XNNPACK's options");
  const bool* v = std::get_if<bool>(&get.view()[0].value);
  return v ? (int)*v : fail("XNNPACK's weight_cache_enabled is not a bool");
}

void etl_close(void* p) {
  delete static_cast<Handle*>(p);
  std::lock_guard<std::mutex> g(g_live_mu);
  --g_live;
}

// The size of ExecuTorch's thread pool (the caller counts as one thread: 1 runs everything on it, with
// no worker to spin); n <= 0 only reads it. A reset replaces the pool, and every XNNPACK runtime keeps
// the pool it was created with, so the size can change only while no method is loaded. Returns the
// size in effect, or -1 (see etl_last_error).
int etl_threads(int n) {
  runtime_init();
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) return fail("ExecuTorch has no thread pool");
  if (n > 0 && (size_t)n != pool->get_thread_count()) {
    std::lock_guard<std::mutex> g(g_live_mu);
    if (g_live > 0)
      return fail("ExecuTorch's thread pool has " + std::to_string(pool->get_thread_count()) + " threads and " +
                  std::to_string(g_live) + " loaded method(s) use it; it cannot change to " + std::to_string(n));
    if (!pool->_unsafe_reset_threadpool((uint32_t)n)) return fail("ExecuTorch could not resize its thread pool");
  }
  return (int)pool->get_thread_count();
}
size_t etl_release(void* p) { return static_cast<Handle*>(p)->loader->release(); }

// Plans every XNNPACK runtime of the method now (xnn_reshape_runtime, as its first execute would), so
// the workspace they share reaches its final size at load. On a first step it grows delegate by
// delegate, each time a new buffer allocated before the old one is freed, late in the step when the
// planned arena is resident: that transient raised the process peak. Returns the runtimes planned.
int etl_presize(void* p) {
  auto* h = static_cast<Handle*>(p);
  int n = 0;
  for (void* rt : h->runtimes) {
    if (xnn_reshape_runtime(rt) != 0) return fail("XNNPACK could not plan a delegate's runtime");
    ++n;
  }
  h->runtimes.clear();
  return n;
}
size_t etl_planned_bytes(void* p) { return static_cast<Handle*>(p)->planned_bytes; }
int etl_num_inputs(void* p) { return (int)static_cast<Handle*>(p)->method->inputs_size(); }
int etl_num_outputs(void* p) { return (int)static_cast<Handle*>(p)->method->outputs_size(); }

int etl_input_meta(void* p, int i, int* dtype, int* ndim, int64_t* sizes) {
  auto info = static_cast<Handle*>(p)->method->method_meta().input_tensor_meta(i);
  if (!info.ok()) return fail("input " + std::to_string(i) + " is not a tensor");
  auto s = info->sizes();
  if (s.size() > 16) return fail("too many dimensions");
  *dtype = (int)info->scalar_type();
  *ndim = (int)s.size();
  for (size_t d = 0; d < s.size(); ++d) sizes[d] = s[d];
  return 0;
}

int etl_output_meta(void* p, int i, int* dtype, int* ndim, int64_t* sizes) {
  auto info = static_cast<Handle*>(p)->method->method_meta().output_tensor_meta(i);
  if (!info.ok()) return fail("output " + std::to_string(i) + " is not a tensor");
  auto s = info->sizes();
  if (s.size() > 16) return fail("too many dimensions");
  *dtype = (int)info->scalar_type();
  *ndim = (int)s.size();
  for (size_t d = 0; d < s.size(); ++d) sizes[d] = s[d];
  return 0;
}

// Copies a C-contiguous host array into input i (the method's own memory-planned tensor).
int etl_set_input(void* p, int i, void* data, int dtype, int ndim, const int64_t* sizes) {
  if (ndim > 16) return fail("too many dimensions");
  int32_t sz[16], st[16];
  uint8_t order[16];
  int32_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    sz[d] = (int32_t)sizes[d];
    st[d] = stride;
    stride *= sz[d];
    order[d] = (uint8_t)d;
  }
  TensorImpl impl((ScalarType)dtype, ndim, sz, data, order, st);
  Error e = static_cast<Handle*>(p)->method->set_input(EValue(Tensor(&impl)), i);
  if (e != Error::Ok) return fail("input " + std::to_string(i) + " was refused (error " + std::to_string((int)e) + ")");
  return 0;
}

int etl_execute(void* p) {
  Error e = static_cast<Handle*>(p)->method->execute();
  if (e != Error::Ok) return fail("execution failed (error " + std::to_string((int)e) + ")");
  return 0;
}

// Runs the method one instruction at a time (Method::step) and writes each one's thread CPU time in
// microseconds to us[i] (up to cap of them): where a step's time goes, per operator or delegate call.
// Returns the number of instructions run, or -1 (see etl_last_error).
int etl_execute_timed(void* p, double* us, int cap) {
  Method* m = static_cast<Handle*>(p)->method.get();
  int n = 0;
  for (;;) {
    timespec a, b;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    Error e = m->step();
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
    if (e == Error::EndOfMethod) break;
    if (e != Error::Ok) {
      (void)m->reset_execution();
      return fail("instruction " + std::to_string(n) + " failed (error " + std::to_string((int)e) + ")");
    }
    if (n < cap) us[n] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) * 1e-3;
    ++n;
  }
  Error e = m->reset_execution();
  return e == Error::Ok ? n : fail("cannot reset the method after stepping it");
}

// Output i: dtype, shape and a pointer into the method's arena (valid until the next execute).
int etl_output(void* p, int i, int* dtype, int* ndim, int64_t* sizes, const void** data, size_t* nbytes) {
  const EValue& v = static_cast<Handle*>(p)->method->get_output(i);
  if (!v.isTensor()) return fail("output " + std::to_string(i) + " is not a tensor");
  const Tensor& t = v.toTensor();
  if (t.dim() > 16) return fail("too many dimensions");
  *dtype = (int)t.scalar_type();
  *ndim = (int)t.dim();
  for (int d = 0; d < t.dim(); ++d) sizes[d] = t.size(d);
  *data = t.const_data_ptr();
  *nbytes = t.nbytes();
  return 0;
}
}
"""

# ExecuTorch ScalarType codes.
_DTYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int32): 3, np.dtype(np.int64): 4,
           np.dtype(np.float32): 6, np.dtype(np.float64): 7, np.dtype(np.bool_): 11}
_NP = {v: k for k, v in _DTYPES.items()}


def _executorch_root() -> Path:
    """The installed executorch package directory, found without importing it (it imports torch)."""
    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeRuntimeError("the executorch target needs the 'executorch' package installed")
    return Path(list(spec.submodule_search_locations)[0])


def _build_shim() -> Path:
    prebuilt = os.environ.get("EDGETL_ET_SHIM")
    if prebuilt:
        return Path(prebuilt)
    root = _executorch_root()
    inc, lib = root / "include", root / "lib"
    if not (inc / "executorch" / "runtime" / "executor" / "program.h").is_file() or \
            not (lib / "libexecutorch.so").is_file():
        raise EdgeRuntimeError(f"the executorch package at {root} ships no C++ runtime "
                               "(include/, lib/libexecutorch.so)")
    version = (root / "version.py").read_bytes() if (root / "version.py").is_file() else b""
    key = hashlib.sha256(_SHIM_SOURCE.encode() + version + str(root).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("EDGETL_CACHE", Path.home() / ".cache" / "edgetl"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "edgetl-cache"
    target = cache / f"libedgetl_executorch_{key}.so"
    if target.is_file():
        return target
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise EdgeRuntimeError("the executorch backend needs a C++ compiler once, to build its runtime shim "
                               "(or set EDGETL_ET_SHIM to a prebuilt one)")
    import fcntl

    with open(cache / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (e.g. parallel test workers); the rest reuse it
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, obj = Path(tmp) / "shim.cpp", Path(tmp) / "shim.so"
            src.write_text(_SHIM_SOURCE)
            libs = [f"-l{n}" for n in ("executorch_kernels_optimized", "executorch_backend_xnnpack",
                                       "executorch_threadpool") if (lib / f"lib{n}.so").is_file()]
            cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-DC10_USING_CUSTOM_GENERATED_MACROS",
                   "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL", f"-I{inc}",
                   f"-I{inc / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}", str(src), "-o",
                   str(obj), f"-L{lib}", "-Wl,--no-as-needed", *libs, "-lexecutorch", "-Wl,--as-needed",
                   "-ldl", f"-Wl,-rpath,{lib}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise EdgeRuntimeError(f"building the ExecuTorch runtime shim failed:\n{r.stderr[-2000:]}")
            os.replace(obj, target)  # atomic: a reader never sees a half-written library
    return target


_LIB = None


def _last_error(L) -> str:
    """The shim's message for its last failed call."""
    return (L.etl_last_error() or b"").decode(errors="replace")


def share_packed_weights(on: bool) -> bool:
    """Whether XNNPACK packs a constant once for every delegate call and program that uses it (its
    weight cache), e.g. the frozen weights of the eval program and the train step's forward; for
    programs loaded after the call, process-wide. False where the runtime cannot (an older shim)."""
    L = _lib()
    if not hasattr(L, "etl_xnnpack_weight_cache"):
        return False
    got = L.etl_xnnpack_weight_cache(1 if on else 0)
    if got < 0:
        raise EdgeRuntimeError(f"ExecuTorch: {_last_error(L)}")
    return bool(got)


def pool_threads(n: int | None = None) -> int | None:
    """The size of ExecuTorch's thread pool, which XNNPACK's delegates and the optimized kernels run on
    (the calling thread is one of them: 1 computes on the caller alone); with `n`, resized first. A
    resize replaces the pool, so it is refused (EdgeRuntimeError) while a loaded program uses it. None
    where the runtime cannot tell (an older shim)."""
    L = _lib()
    if not hasattr(L, "etl_threads"):
        return None
    got = L.etl_threads(n if n is not None else 0)
    if got < 0:
        raise EdgeRuntimeError(f"ExecuTorch: {_last_error(L)}")
    return got


def _lib():
    global _LIB
    if _LIB is None:
        L = ctypes.CDLL(str(_build_shim()))
        vp, i32, i64p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
        ip = ctypes.POINTER(ctypes.c_int)
        L.etl_last_error.restype = ctypes.c_char_p
        L.etl_open.restype, L.etl_open.argtypes = vp, [vp, ctypes.c_size_t, ctypes.c_char_p]
        L.etl_close.argtypes = [vp]
        if hasattr(L, "etl_release"):
            L.etl_release.restype, L.etl_release.argtypes = ctypes.c_size_t, [vp]
        if hasattr(L, "etl_presize"):
            L.etl_presize.argtypes = [vp]
        L.etl_planned_bytes.restype, L.etl_planned_bytes.argtypes = ctypes.c_size_t, [vp]
        for f in (L.etl_num_inputs, L.etl_num_outputs, L.etl_execute):
            f.argtypes = [vp]
        L.etl_input_meta.argtypes = [vp, i32, ip, ip, i64p]
        if hasattr(L, "etl_output_meta"):  # a prebuilt shim (EDGETL_ET_SHIM) may predate it
            L.etl_output_meta.argtypes = [vp, i32, ip, ip, i64p]
        L.etl_set_input.argtypes = [vp, i32, vp, i32, i32, i64p]
        L.etl_output.argtypes = [vp, i32, ip, ip, i64p, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_size_t)]
        if hasattr(L, "etl_execute_timed"):
            L.etl_execute_timed.argtypes = [vp, ctypes.c_void_p, i32]
        for f in ("etl_xnnpack_weight_cache", "etl_xnnpack_sharing", "etl_threads"):
            if hasattr(L, f):
                getattr(L, f).argtypes = [i32]
        _LIB = L
    return _LIB


class NativeMethod:
    """One method of a .pte program on ExecuTorch's C++ runtime: numpy in, numpy out."""

    def __init__(self, program: Path | bytes, method: str = "forward", name: str | None = None,
                 release: bool = True, presize: bool = True, on_stage: Callable[[str], None] | None = None):
        """`program`: a .pte file, or its bytes (a bundle's, as checked against its manifest).
        `release`: once the method is loaded, return to the system the pages of the program that
        ExecuTorch has freed (the delegates' blobs, and the weights XNNPACK packed into its own
        storage: for frozen weights, the fp32 copy restored from int8). `on_stage(name)` is called
        after each load stage (for memory breakdowns: bench/et_load_memory.py). `presize`: plan the
        XNNPACK delegates at load, so their shared workspace has its final size before a step runs
        (else it grows during the first step, old and new buffer both resident at each growth)."""
        stage = on_stage or (lambda _: None)
        self.L = _lib()
        name = name or (Path(program).name if not isinstance(program, bytes) else "program")
        data = program if isinstance(program, bytes) else Path(program).read_bytes()
        packed = is_packed(data)  # frozen weights stored int8: rebuilt byte-exactly into the buffer
        size = unpacked_size(data) if packed else len(data)
        # The runtime reads constants and delegate blobs from this buffer, so it lives as long as the
        # method: a private anonymous mapping of its own (page-aligned whatever the allocator does),
        # whose pages the shim hands back once ExecuTorch has freed what they hold.
        self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._buffer = np.frombuffer(self._map, np.uint8, size)
        if packed:
            unpack(data, self._buffer)
        else:
            self._buffer[:] = np.frombuffer(data, np.uint8)
        del data
        stage("restored")
        pool_threads(threads_from_env())  # before any XNNPACK runtime is made: they keep the pool they are given
        self.h = self.L.etl_open(self._buffer.ctypes.data, len(self._buffer), method.encode())
        if not self.h:
            raise EdgeRuntimeError(f"ExecuTorch cannot load '{name}': {self._error()}")
        stage("loaded")
        self.released_bytes = 0
        if release and hasattr(self.L, "etl_release"):  # a prebuilt shim (EDGETL_ET_SHIM) may predate it
            self.released_bytes = int(self.L.etl_release(self.h))
            stage("released")
        self.presized_runtimes = 0
        if presize and hasattr(self.L, "etl_presize"):
            got = self.L.etl_presize(self.h)
            if got < 0:
                raise EdgeRuntimeError(f"ExecuTorch cannot load '{name}': {self._error()}")
            self.presized_runtimes = got
            stage("XNNPACK workspace sized")
        self.inputs = []
        for i in range(self.L.etl_num_inputs(self.h)):
            dt, nd, sz = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * 16)()
            self._check(self.L.etl_input_meta(self.h, i, dt, nd, sz))
            self.inputs.append((_NP[dt.value], tuple(sz[: nd.value])))
        self.num_outputs = self.L.etl_num_outputs(self.h)
        self.outputs = None  # [(dtype, sizes)] where the shim reports them
        if hasattr(self.L, "etl_output_meta"):
            self.outputs = []
            for i in range(self.num_outputs):
                dt, nd, sz = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * 16)()
                if self.L.etl_output_meta(self.h, i, dt, nd, sz) != 0:
                    self.outputs = None
                    break
                self.outputs.append((_NP.get(dt.value), tuple(sz[: nd.value])))
        self.planned_bytes = int(self.L.etl_planned_bytes(self.h))

    def _error(self) -> str:
        return _last_error(self.L)

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise EdgeRuntimeError(f"ExecuTorch: {self._error()}")

    def __call__(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self._set_inputs(inputs)
        self._check(self.L.etl_execute(self.h))
        return self._outputs()

    def timed(self, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """As a call, run one instruction at a time; also returns each instruction's thread CPU time
        in ms, in execution order (bench/et_step_profile.py maps them to operators and delegates)."""
        if not hasattr(self.L, "etl_execute_timed"):
            raise EdgeRuntimeError("this ExecuTorch shim cannot time instructions (a prebuilt one predating it)")
        cap = 1 << 16
        us = np.zeros(cap, np.float64)
        self._set_inputs(inputs)
        n = self.L.etl_execute_timed(self.h, us.ctypes.data, cap)  # instructions run; negative on error
        if n < 0:
            raise EdgeRuntimeError(f"ExecuTorch: {self._error()}")
        return self._outputs(), us[: min(n, cap)] / 1000

    def _set_inputs(self, inputs: list[np.ndarray]) -> None:
        if len(inputs) != len(self.inputs):
            raise EdgeRuntimeError(f"the program takes {len(self.inputs)} inputs, got {len(inputs)}")
        for i, (a, (dtype, shape)) in enumerate(zip(inputs, self.inputs)):
            a = np.require(a, dtype=dtype, requirements="C")
            if a.shape != shape:
                raise EdgeRuntimeError(f"input {i} must have shape {shape}, got {a.shape}")
            self._check(self.L.etl_set_input(self.h, i, a.ctypes.data, _DTYPES[a.dtype], a.ndim,
                                             (ctypes.c_int64 * max(1, a.ndim))(*a.shape)))

    def _outputs(self) -> list[np.ndarray]:
        outs = []
        dt, nd, sz = ctypes.c_int(), ctypes.c_int(), (ctypes.c_int64 * 16)()
        ptr, nb = ctypes.c_void_p(), ctypes.c_size_t()
        for i in range(self.num_outputs):
            self._check(self.L.etl_output(self.h, i, dt, nd, sz, ptr, nb))
            a = np.empty(tuple(sz[: nd.value]), _NP[dt.value])  # copy: the arena is reused next call
            if nb.value:
                ctypes.memmove(a.ctypes.data, ptr.value, nb.value)
            outs.append(a)
        return outs

    def __del__(self):
        h, self.h = getattr(self, "h", None), None
        if h:
            self.L.etl_close(h)
        self._buffer = None  # the view first: a mapping with a live export cannot close
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view of it is still alive somewhere: the mapping goes with it
                pass


class ExecuTorchBackend(HostStateBackend):
    def __init__(self, bundle: Bundle, release_program: bool = True, share_weights: bool = True,
                 presize_workspace: bool = True, on_stage: Callable[[str], None] | None = None):
        """`release_program`, `presize_workspace` (NativeMethod's `presize`), `on_stage`: see
        NativeMethod (stages are named 'train_step: loaded', ...).
        `share_weights`: see share_packed_weights (the eval program then packs no weights of its own)."""
        super().__init__(bundle)
        stage = on_stage or (lambda _: None)
        share_packed_weights(share_weights)
        self.before_programs = Resident.now()  # the runtime's libraries loaded, no program yet
        methods = {}
        for role in ("train_step", "eval"):
            # from the checked bytes, not the paths: a file replaced since the bundle was loaded is not run
            methods[role] = NativeMethod(bundle.program_bytes(role), name=bundle.program(role).name,
                                         release=release_program, presize=presize_workspace,
                                         on_stage=lambda s, r=role: stage(f"{r}: {s}"))
            stage(f"{role}: file bytes dropped")
        self.train, self.eval = methods["train_step"], methods["eval"]
        check_positional_programs(bundle.manifest, {
            role: (m.inputs, m.num_outputs, m.outputs) for role, m in (("train_step", self.train), ("eval", self.eval))})
        self.batch = int(self.eval.inputs[0][1][0])
        self.set_state(bundle.initial_state())

    def train_step(self, x, y, lr):
        outs = self.train([x, y, np.asarray(lr, dtype=np.float32), *self.params, *self.state])
        n = len(self.params)
        self.params, self.state = outs[2 : 2 + n], outs[2 + n :]
        return float(outs[0]), outs[1]

    def logits(self, x):
        b, out = self.batch, []
        for i in range(0, len(x), b):
            chunk = x[i : i + b]
            k = len(chunk)
            if k < b:  # the program's batch is static: pad the last chunk, keep only its rows
                chunk = np.concatenate([chunk, np.zeros((b - k, *chunk.shape[1:]), chunk.dtype)])
            out.append(self.eval([chunk, *self.params])[0][:k])
        return np.concatenate(out)

    def inference_files(self, out: Path) -> list[Path]:
        out = Path(out)
        if out.suffix in (".npz", ".json"):  # the program would be overwritten by its own sidecar
            raise InputError(f"'{out}' names the inference program's sidecar; give a .pte file name")
        npz, meta = out.with_suffix(".npz"), out.with_suffix(".json")
        # the sidecars are not named by the user: only those of an earlier export to `out` are replaced
        try:
            doc = json.loads(meta.read_text()) if meta.is_file() else None
            ours = isinstance(doc, dict) and doc.get("program") == out.name and doc.get("params_file") == npz.name
        except (OSError, ValueError, RecursionError):
            ours = False
        for p in (npz, meta):
            if (p.exists() or p.is_symlink()) and not ours:
                raise InputError(f"exporting to '{out}' would overwrite '{p}', which an earlier export to it did "
                                 f"not write; choose another name or remove it")
        return [out, npz, meta]

    def export_inference(self, out: Path) -> list[Path]:
        """ExecuTorch programs cannot be re-written without torch, so the inference program is the
        bundle's eval program (`out`, a .pte) with the trained parameters beside it (`out` with
        suffix .npz) and a JSON sidecar naming the input order, static batch and preprocessing
        (inputs are normalized images: (x - mean) / std, unlike the onnx target's model). With LoRA
        it is the bundle's inference program, whose layers are the original ones reading the merged
        weights W' = W + scale·B·A from the .npz (no LoRA branch left)."""
        out, npz, meta = self.inference_files(out)
        names, params, data = self.bundle.trainable, list(self.params), self.bundle.program_bytes("eval")
        if "lora" in self.bundle.manifest:  # LoRA: the updates merged into the weights of the original layers
            names, params, data = self._merged_inference()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(unpack(data).tobytes() if is_packed(data) else data)  # a plain .pte for other runtimes
        np.savez(npz, **{f"a{i}": p for i, p in enumerate(params)})
        m = self.bundle.manifest
        meta.write_text(json.dumps({
            "program": out.name, "params_file": npz.name,
            "inputs": [X, *names], "params_keys": {n: f"a{i}" for i, n in enumerate(names)},
            "static_batch": self.batch, "input": m["input"], "num_classes": m["num_classes"],
            "note": "x must be normalized: (x - mean) / std per channel, x in [0, 1]; pad to the static batch",
        }, indent=2))
        return [out, npz, meta]

    def _merged_inference(self) -> tuple[list[str], list[np.ndarray], bytes]:
        """The LoRA inference program's input names and values after x (the trained parameters
        outside the branches, then W' = W + scale·B·A per layer) and its bytes, checked against
        the program's inputs before anything is written."""
        spec = self.bundle.manifest["lora"]
        named = dict(zip(self.bundle.trainable, self.params))
        named |= merged_weights(self.bundle, named)
        names = spec.get("inputs")
        if not isinstance(names, list) or not all(isinstance(n, str) and n in named for n in names):
            raise BundleError("the bundle's lora entry does not name the inference program's inputs")
        params = [named[n] for n in names]
        data = self.bundle.program_bytes(spec["program"])
        program = NativeMethod(data, name=self.bundle.program(spec["program"]).name)
        given = [(np.dtype(np.float32), tuple(p.shape)) for p in params]
        if [(np.dtype(d), s) for d, s in program.inputs[1:]] != given:
            raise BundleError("the bundle's LoRA inference program does not take the merged weights its lora entry names")
        return names, params, data

    def planned_bytes(self):
        info = self.bundle.manifest.get("executorch", {})
        return int(info["planned_bytes"]) if "planned_bytes" in info else self.train.planned_bytes
