"""The entry points' re-exec with glibc's hugetlb tunable (saisa_jax/backends/cpu/hugepages.py)."""
import os
import subprocess
import sys

import pytest

from saisa_jax.backends.cpu import hugepages

_CHILD = ("import os, sys; from saisa_jax.backends.cpu import hugepages; hugepages.reexec(); "
          "print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])")


def test_tunables_keep_what_the_user_set():
  assert hugepages.tunables_with_hugepages(None) == "glibc.malloc.hugetlb=1"
  both = hugepages.tunables_with_hugepages("glibc.malloc.arena_max=2")
  assert both == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # The bench's PyTorch peer gets the user's tunables back, without ours.
  assert hugepages.tunables_without_hugepages(both) == "glibc.malloc.arena_max=2"
  assert hugepages.tunables_without_hugepages("glibc.malloc.hugetlb=1") is None
  assert hugepages.tunables_without_hugepages(None) is None


def test_opt_out_and_already_set_are_respected():
  assert not hugepages.wanted({"SAISA_HUGEPAGES": "0"})
  assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_called_from_python_never_reexecs(monkeypatch):
  monkeypatch.setattr(hugepages, "wanted", lambda environ=None: True)
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed a library call"))
  hugepages.reexec(["--flag"])  # main(argv=[...]) from tests / notebooks


def _run(env):
  return subprocess.run([sys.executable, "-c", _CHILD, "a", "b"], env=env, check=True,
                        capture_output=True, text=True).stdout.strip()


def test_process_reexecs_once_with_same_arguments():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "SAISA_HUGEPAGES")}
  out = _run(env)
  if hugepages.wanted(env):
    assert out == "TUNABLES=glibc.malloc.hugetlb=1 ['a', 'b']"
  else:  # no THP or not glibc >= 2.35 here: nothing to gain, nothing changes
    assert out == "TUNABLES= ['a', 'b']"
  assert _run({**env, "SAISA_HUGEPAGES": "0"}) == "TUNABLES= ['a', 'b']"
