"""Transparent huge pages for XLA:CPU's host buffers.

Why: XLA:CPU gives each execution its temporaries as one block (124 MiB for the tiny
bench llava train step, GBs at smollm2 shapes). glibc serves a block that large from a
fresh mmap and unmaps it when the call ends, so every call faults in each 4 KiB page it
touches: 31.7k page faults per tiny llava train step. glibc's `hugetlb` tunable makes
malloc advise the kernel to back such blocks with 2 MiB pages (512x fewer faults).
Measured on the 2-core CPU (README, "FLOPs and performance"): train step 8-16% faster,
prefill 1-9%.

glibc reads tunables only when a process starts, so the command-line entry points call
`reexec()` first: when it would help and is not yet set, the process replaces itself
with the same command and GLIBC_TUNABLES set. Nothing happens when
  - the kernel's THP mode is `never` or glibc is older than 2.35 (no such tunable),
  - SAISA_HUGEPAGES=0 is set (opt out), or GLIBC_TUNABLES already names the tunable,
  - the entry point was called from Python (main(argv=[...]), tests): only a process's
    own command line is re-executed.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  try:
    _, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
  except (AttributeError, ValueError, OSError):
    return None  # not glibc (musl, macOS)


def _thp_mode() -> str | None:
  """The bracketed choice in the kernel's THP setting: always | madvise | never."""
  try:
    text = open(_THP_MODE).read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def wanted(environ=None) -> bool:
  environ = os.environ if environ is None else environ
  if environ.get("SAISA_HUGEPAGES", "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return False
  version = _glibc_version()
  return version is not None and version >= (2, 35) and _thp_mode() in ("always", "madvise")


def tunables_with_hugepages(current: str | None) -> str:
  """GLIBC_TUNABLES with hugetlb=1 added to whatever the user already set."""
  return ":".join(filter(None, [current, f"{TUNABLE}=1"]))


def tunables_without_hugepages(current: str | None) -> str | None:
  """GLIBC_TUNABLES minus the hugetlb setting (None when nothing else is left)."""
  kept = [t for t in (current or "").split(":") if t and not t.startswith(TUNABLE + "=")]
  return ":".join(kept) or None


def reexec(argv=None) -> None:
  """Call first thing in a console entry point's main(argv=None). Does not return when it
  re-executes (same interpreter, same command line, same environment plus the tunable)."""
  if argv is not None or not wanted() or not getattr(sys, "orig_argv", None):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = tunables_with_hugepages(env.get("GLIBC_TUNABLES"))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
