"""attention=cpu: the fused C++ attention kernel of cpu_kernels/attention.cc, called
through XLA's FFI (float32, XLA:CPU).

The kernel is compiled on first use with the system C++ compiler against the FFI
headers that ship with jaxlib, for this machine's vector ISA (-march=native), into a
cache keyed by the source, jaxlib, compiler and CPU features (SAISA_KERNEL_CACHE, default
~/.cache/saisa_jax/kernels). A missing compiler is a clear error naming the fix.

Shapes: q float32[B, Q, H, D], k/v float32[B, K, Hkv, D], bias float32[B, Q, K] or None
-> float32[B, Q, H, D]; D a multiple of 16 up to 256. The backward recomputes the
probabilities from the saved log-sum-exp, so no [Q, K] matrix is kept for it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib

_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels", "attention.cc")
_TARGETS = ("SaisaAttentionForward", "SaisaAttentionBackward", "SaisaAttentionPrefill")
_LOCK = threading.Lock()
_LIB: list = []  # the loaded library, once registered


def supported_head_dim(d: int) -> bool:
  return d % 16 == 0 and 16 <= d <= 256 and (d // 16) in (1, 2, 4, 8, 16)


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not cxx:
    raise RuntimeError("model.attention=cpu compiles a C++ kernel on first use and found no "
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
  """Path of the compiled kernel library, compiling it if this source, jaxlib and
  compiler have not been built yet."""
  cxx = _compiler()
  src = open(_SOURCE, "rb").read()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
  key = hashlib.sha256(src + jaxlib.__version__.encode() + cxx.encode()
                       + " ".join(flags).encode() + _cpu_flags()).hexdigest()[:16]
  cache = os.environ.get("SAISA_KERNEL_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "saisa_jax", "kernels"))
  lib = os.path.join(cache, f"attention-{key}.so")
  if os.path.exists(lib):
    return lib
  os.makedirs(cache, exist_ok=True)
  print(f"saisa_jax: compiling the CPU attention kernel ({cxx}) -> {lib}", file=sys.stderr)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
  os.close(fd)
  cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
  res = subprocess.run(cmd, capture_output=True, text=True)
  if res.returncode:
    os.unlink(tmp)
    raise RuntimeError(f"compiling {_SOURCE} failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}\n"
                       "model.attention=einsum needs no compiler")
  os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
  return lib


def ensure_registered() -> None:
  with _LOCK:
    if _LIB:
      return
    lib = ctypes.cdll.LoadLibrary(_build())
    for name in _TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    _LIB.append(lib)


def attend(q, k, v, bias, causal_from: int | None = None):
  """See module docstring. causal_from: key causal_from + j is hidden from query i
  when j > i (attention.py's causal promise); the kernel then reads, for a block of 8
  query rows, only the keys up to causal_from + its last row. None reads every key."""
  ensure_registered()
  cf = _keys_read(causal_from, k.shape[1])
  return _attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                 None if bias is None else bias.astype(jnp.float32), cf).astype(q.dtype)


def attend_prefill(q, k, v, bias, causal_from: int | None, slots: int):
  """attend() that also returns the prefill's KV cache in attention.attend_cached's
  layouts: (out float[B, Q, H, D], k float32[B, Hkv, D, S] keys transposed, v
  float32[B, Hkv, S, D]), zero past the K keys. The kernel writes the cache from the
  by-column copies it makes anyway. Inference only (no gradient)."""
  ensure_registered()
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  if slots < tk:
    raise ValueError(f"cache_size {slots} < the prompt's {tk} keys")
  cf = _keys_read(causal_from, tk)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out, _, kc, vc = jax.ffi.ffi_call(
      "SaisaAttentionPrefill",
      (f32(q.shape), f32((b, h, tq)), f32((b, hkv, d, slots)), f32((b, hkv, slots, d))),
      vmap_method="sequential")(
          q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
          _dummy_bias() if bias is None else bias.astype(jnp.float32),
          causal_from=cf, has_bias=bias is not None, slots=slots)
  return out.astype(q.dtype), kc, vc


def _keys_read(causal_from: int | None, tk: int) -> int:
  """The kernel's causal_from attribute: tk (or more) reads every key."""
  return tk if causal_from is None else min(int(causal_from), tk)


def _dummy_bias():
  return jnp.zeros((1, 1, 1), jnp.float32)


def _forward(q, k, v, bias, causal_from):
  b, tq, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      "SaisaAttentionForward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)),
      vmap_method="sequential")(q, k, v, _dummy_bias() if bias is None else bias,
                                causal_from=causal_from, has_bias=bias is not None)
  return out, (q, k, v, bias, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, causal_from):
  return _forward(q, k, v, bias, causal_from)[0]


def _attend_fwd(q, k, v, bias, causal_from):
  return _forward(q, k, v, bias, causal_from)


def _attend_bwd(causal_from, res, do):
  q, k, v, bias, out, lse = res
  dq, dk, dv = jax.ffi.ffi_call(
      "SaisaAttentionBackward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential")(q, k, v, _dummy_bias() if bias is None else bias, out, lse,
                                do.astype(jnp.float32), causal_from=causal_from,
                                has_bias=bias is not None)
  return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)


_attend.defvjp(_attend_fwd, _attend_bwd)
