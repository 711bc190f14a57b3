"""The C++ kernels of cpu_kernels/ (attention.cc, decoder_layer.cc, patch_embed.cc,
visual_kv.cc; XLA FFI custom calls for XLA:CPU), compiled into one library on first use
and registered with XLA.

The library is built with the system C++ compiler against the FFI headers that ship
with jaxlib, for this machine's vector ISA (-march=native), into a cache keyed by the
sources, jaxlib, compiler and CPU features (SAISA_KERNEL_CACHE, default
~/.cache/saisa_jax/kernels). A missing compiler is a clear error naming the fix.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jaxlib

_DIR = os.path.join(os.path.dirname(__file__), "kernels")
_SOURCES = ("attention.cc", "clip_layer.cc", "decoder_layer.cc", "patch_embed.cc", "visual_kv.cc")
_HEADERS = ("simd.h", "attention_fwd.h", "gemm.h", "rows.h")
_TARGETS = ("SaisaAttentionForward", "SaisaAttentionBackward",
            "SaisaPatchEmbed", "SaisaVisualKV", "SaisaDecoderLayer", "SaisaClipLayer")
_LOCK = threading.Lock()
_LIB: list = []  # the loaded library, once registered


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not cxx:
    raise RuntimeError("model.attention=cpu compiles C++ kernels on first use and found no "
                       "C++ compiler (set CXX, or install g++: apt-get install g++); "
                       "model.attention=einsum needs none")
  return cxx


def _cpu_flags() -> bytes:
  """This CPU's feature flags: -march=native code must not be reused by a machine with
  fewer (a home directory shared across a cluster's nodes)."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith(b"flags")), b"")
  except OSError:
    import platform
    return platform.processor().encode()


def _build() -> str:
  """Path of the compiled kernel library, compiling it if these sources, jaxlib and
  compiler have not been built yet."""
  cxx = _compiler()
  sources = [os.path.join(_DIR, name) for name in _SOURCES]
  src = b"".join(open(os.path.join(_DIR, name), "rb").read() for name in _SOURCES + _HEADERS)
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
  key = hashlib.sha256(src + jaxlib.__version__.encode() + cxx.encode()
                       + " ".join(flags).encode() + _cpu_flags()).hexdigest()[:16]
  cache = os.environ.get("SAISA_KERNEL_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "saisa_jax", "kernels"))
  lib = os.path.join(cache, f"saisa-kernels-{key}.so")
  if os.path.exists(lib):
    return lib
  os.makedirs(cache, exist_ok=True)
  print(f"saisa_jax: compiling the CPU kernels ({cxx}) -> {lib}", file=sys.stderr)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
  os.close(fd)
  cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", *sources, "-o", tmp]
  res = subprocess.run(cmd, capture_output=True, text=True)
  if res.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"compiling {', '.join(sources)} failed ({' '.join(cmd)}):\n"
                       f"{res.stderr[-3000:]}\n"
                       "model.attention=einsum needs no compiler")
  os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
  return lib


def ensure_registered() -> None:
  """Builds (once per machine) and registers every kernel of the library."""
  with _LOCK:
    if _LIB:
      return
    lib = ctypes.cdll.LoadLibrary(_build())
    for name in _TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    _LIB.append(lib)


