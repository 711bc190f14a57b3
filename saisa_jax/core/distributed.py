"""Several JAX processes as one job (a TPU pod slice, a GPU cluster, a local rehearsal).

Every host runs the same command; `initialize` joins them into one runtime, after
which `jax.devices()` is the global device list and one mesh spans all hosts.

Where the process count and id come from:
  - TPU pods, SLURM, Open MPI, k8s: JAX's own cluster detection
    (`config.train.distributed=True`, or just a TPU pod's metadata);
  - anywhere else (launch/local_pod.py, a hand-made cluster): the environment
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i.

Host-side agreement (`agree_max`) goes through the coordination service's key-value
store, not a device collective, so it never waits for the device queue to drain.
"""
from __future__ import annotations

import os

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def initialize(requested: bool = False) -> None:
  """Joins the job's other processes when the environment (or `requested`) says there
  are any; a single process with neither does nothing."""
  if _initialized():
    return
  if ENV_COUNT in os.environ or ENV_ID in os.environ:
    missing = [v for v in (ENV_ADDRESS, ENV_COUNT, ENV_ID) if v not in os.environ]
    if missing:
      raise ValueError(f"several processes need {ENV_ADDRESS}, {ENV_COUNT} and {ENV_ID} "
                       f"together; missing: {', '.join(missing)}")
    jax.distributed.initialize(coordinator_address=os.environ[ENV_ADDRESS],
                               num_processes=int(os.environ[ENV_COUNT]),
                               process_id=int(os.environ[ENV_ID]))
  elif requested or ENV_ADDRESS in os.environ:
    jax.distributed.initialize()  # cluster detection: TPU metadata, SLURM, MPI, k8s


def _initialized() -> bool:
  from jax._src import distributed as dist
  return dist.global_state.client is not None


def is_primary() -> bool:
  """Process 0: the one that writes metrics, results, configs and curves."""
  return jax.process_index() == 0


def allgather_ints(name: str, values) -> list[list[int]]:
  """Every process's list of ints, in process order (each process calls with the same
  `name`, new each call). Host RPCs only; one process gets [values]."""
  values = [int(v) for v in values]
  if jax.process_count() == 1:
    return [values]
  from jax._src import distributed as dist
  client = dist.global_state.client
  client.key_value_set(f"saisa/{name}/{jax.process_index()}", ",".join(map(str, values)))
  got = [client.blocking_key_value_get(f"saisa/{name}/{i}", 600_000)
         for i in range(jax.process_count())]
  return [[int(v) for v in g.split(",") if v] for g in got]


def agree_max(name: str, value: int) -> int:
  """The largest `value` over all processes (see allgather_ints)."""
  return max(v[0] for v in allgather_ints(name, [value]))


def forget(name: str) -> None:
  """Drops this process's key of an `agree_max` every process has read."""
  if jax.process_count() > 1:
    from jax._src import distributed as dist
    try:
      dist.global_state.client.key_value_delete(f"saisa/{name}/{jax.process_index()}")
    except Exception:  # only memory is at stake
      pass
