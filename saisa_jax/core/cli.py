"""What every absl command line shares: a --help that lists its flags, and one-line
errors for the mistakes users make (a misspelt config path, a missing workdir, model
or image), instead of a traceback. SAISA_TRACEBACK=1 shows the traceback anyway.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags

CONFIG_HELP = """
Config fields: every field of the config file can be set on the command line, e.g.
  --config=configs/default.py:layers=4 --config.finetune.steps=200 --config.eval.enabled=False
The part after ':' goes to the file's get_config (its docstring lists those arguments);
--config.<field>=<value> overrides one field (the sections: model, data, optim, train,
mesh, the stages, eval; see the config file). SAISA_TRACEBACK=1 shows tracebacks.
"""


def set_help(module_name: str, extra: str = "") -> None:
  """`--help` shows `module_name`'s docstring and its flags (absl lists only the key
  flags of the script named in argv[0], which for a console script is a wrapper)."""
  module = sys.modules[module_name]
  main = sys.modules.get("__main__")
  if main is not None:
    main.__doc__ = (module.__doc__ or "") + extra
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def check_config_path(prog: str, argv: list[str] | None, flag: str = "config") -> None:
  """Exits with one line when --config names a file that is not there."""
  argv = sys.argv if argv is None else argv
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith(f"--{flag}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(argv):
      value = argv[i + 1]
    if value is None:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      hint = ""
      here = os.path.dirname(path) or "."
      if os.path.isdir(here):
        near = sorted(f for f in os.listdir(here) if f.endswith(".py"))
        hint = f" (in {here}: {', '.join(near)})" if near else ""
      sys.exit(f"{prog}: config file {path!r} not found{hint}")


def require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r}: no such file")


def one_line(prog: str, fn: Callable) -> Callable:
  """fn, with a missing file / directory reported as one line `prog: <message>`."""
  def run(argv):
    try:
      return fn(argv)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
      if os.environ.get("SAISA_TRACEBACK"):
        raise
      msg = str(e) if e.args and isinstance(e.args[0], str) and len(e.args) == 1 else \
          f"{e.strerror}: {e.filename}"
      sys.exit(f"{prog}: {msg.splitlines()[0] if msg else type(e).__name__} "
               "(SAISA_TRACEBACK=1 for the traceback)")
  return run
