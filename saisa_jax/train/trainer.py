"""saisa-train: the training loop (linear; one banner per phase).

  saisa-train --config configs/default.py --workdir DIR [--config.field=value ...]

WORKDIR/<stage>/checkpoints  orbax: train state + data-iterator state + config
WORKDIR/<stage>/model        the stage's final params (init of the next stage)
WORKDIR/model                the final model (saisa-eval, saisa-export read it)
WORKDIR/metrics.jsonl, tensorboard/, curves.png, eval/results.json
Rerunning the same command resumes from the latest checkpoint; finished stages are
skipped. SIGTERM (preemption) saves a checkpoint and exits with code 143.

Several processes (a pod: one per host, launch/local_pod.py to rehearse) run the same
command and form one mesh. The state stays sharded from init to the final model: every
process saves its shards, stage 2 starts from stage 1's arrays as they lie, the eval
runs under the same mesh, and only process 0 writes metrics, curves and results.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
import flax.linen as nn
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from saisa_jax import backends
from saisa_jax.core import cli, distributed, paths
from saisa_jax.batch import pad_length
from saisa_jax.data.pipeline import elastic_start, make_iterator
from saisa_jax.eval.runner import evaluate, format_table
from saisa_jax.models.build import build
from saisa_jax.models.eas import ADAPTERS
from saisa_jax.core import checkpoint as ckpt_lib
from saisa_jax.train.compiles import CompileWatch
from saisa_jax.train.curves import plot_curves
from saisa_jax.core.mesh import InMesh, global_batch, make_mesh, rules_from_config
from saisa_jax.train.metrics import MetricWriter, progress_line
from saisa_jax.train.optim import make_optimizer
from saisa_jax.train.stages import check_stages, stage_config, stage_names
from saisa_jax.core.state import abstract_params, init_state, missing_params, state_shardings
from saisa_jax.train import eas_search
from saisa_jax.train.step import TRAIN_KEYS, make_loss_fn, make_train_step
from saisa_jax.train.workdir_binding import check_and_bind

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:args].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and models go.")


class _Preempted:
  """Whether to save and stop after the current step.

  One process: SIGTERM sets a flag. Several: the signal reaches the hosts at different
  steps, so they must agree on which step to stop at or they would wait on each other
  in a collective. JAX's preemption service (started by jax.distributed) catches
  SIGTERM on any host and names a step every host reaches; `check` is True there."""

  def __init__(self):
    self.flag = False
    self.multi = jax.process_count() > 1
    if not self.multi:
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, *_):
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.flag = True

  def check(self, step: int) -> bool:
    """Called once after every step, by every process; read the answer once."""
    if self.multi and not self.flag:
      self.flag = multihost_utils.reached_preemption_sync_point(step)
    return self.flag


def to_global(batch: dict, mesh, name: str = "", pad_id: int = 0) -> dict:
  """Per-host numpy batch -> global jax arrays sharded over (data, fsdp). With several
  hosts the text length is agreed first (each host picked the bucket of its own rows):
  `name` keys that agreement and must be new on every call."""
  if jax.process_count() > 1:
    length = distributed.agree_max(f"len/{name}", batch["tokens"].shape[1])
    batch = pad_length(batch, length, pad_id)
  return global_batch(batch, mesh, TRAIN_KEYS)


def maybe_initialize_distributed(config) -> None:
  # Several hosts: each runs this same command; JAX finds its peers (TPU pods: from
  # the metadata server; SLURM / GPU: from the environment the launcher sets;
  # launch/local_pod.py: JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  distributed.initialize(bool(config.train.get("distributed", False)))


def open_data(sc, ckpts, latest, name):
  """The stage's data iterator, and whether to restore its state from the checkpoint:
  on the process count that wrote it, each host restores its own grain state; on
  another count, every host starts where the global stream was left (elastic)."""
  saved = ckpts.positions(latest) if latest is not None else None
  if saved is None or saved["num_processes"] == jax.process_count():
    return make_iterator(sc), latest is not None
  count = jax.process_count()
  start = elastic_start(saved["positions"], saved["block"], jax.process_index(), count,
                        sc.data.batch_size // count)
  it = make_iterator(sc, start=start)
  if distributed.is_primary():  # the skip counts live on in one host
    it.set_skipped(np.sum(saved["skipped"], axis=0))
  print(f"[{name}] elastic resume: the checkpoint was written by {saved['num_processes']} "
        f"processes (read positions {saved['positions']}); this run has {count}: host "
        f"{jax.process_index()} starts at record {start} of its share", flush=True)
  return it, False


def blind_batch(batch: dict) -> dict:
  batch = dict(batch)
  batch["image_slots"] = np.full_like(batch["image_slots"], -1)
  return batch


@dataclasses.dataclass
class StageSetup:
  model: object
  cfg: object
  tx: object
  trainable: object
  abstract_state: dict
  shardings: dict
  step_fn: object
  search: object = None      # eas_search.SearchConfig in a search stage
  losses_fn: object = None   # the search's candidate losses (step.make_loss_fn)


def setup_stage(sc, mesh) -> StageSetup:
  """Model, optimizer, state shardings and the jitted, sharded, donating step."""
  model, cfg = build(sc.model)
  model = backends.for_training(model)  # the model as this machine's backend runs it
  rules = rules_from_config(sc.mesh.rules)
  tx, lr_fn, trainable = make_optimizer(sc.optim, nn.meta.unbox(abstract_params(model, cfg)))
  search, extras = None, None
  if sc.train.get("eas_search"):
    if cfg.eas is None:
      raise ValueError(f"stage {sc.stage!r} runs the EAS search (config.{sc.stage}.search) "
                       "but config.model.eas is not enabled: set model.eas.enabled=True")
    search = eas_search.SearchConfig.from_config(sc.get("eas_search"), cfg.llm.num_layers,
                                                 int(sc.optim.warmup_steps))
    extras = {"eas_scores": jax.ShapeDtypeStruct((cfg.llm.num_layers,), jnp.float32)}
  abstract_state, shardings = state_shardings(model, cfg, tx, mesh, rules, extras)
  # The state is donated: params and optimizer state are updated in place.
  train_step = make_train_step(model, tx, lr_fn, trainable, int(sc.optim.accum_steps))
  if search is None:
    step_fn = jax.jit(train_step, in_shardings=(shardings, None),
                      out_shardings=(shardings, None), donate_argnums=0)
    losses_fn = None
  else:
    step_fn = jax.jit(train_step, in_shardings=(shardings, None, None),
                      out_shardings=(shardings, None), donate_argnums=0)
    losses_fn = InMesh(jax.jit(make_loss_fn(model), in_shardings=(shardings["params"], None,
                                                                 None)), mesh, rules)
  step_fn = InMesh(step_fn, mesh, rules)
  return StageSetup(model, cfg, tx, trainable, abstract_state, shardings, step_fn, search,
                    losses_fn)


def _replicated(mesh, value: np.ndarray):
  """The same host value on every process -> one replicated global array."""
  return jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), value, value.shape)


def _without_adapters(params):
  """params less the EAS adapters (a stage with fresh_adapters initialises them)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if not set(k.split("/")) & set(ADAPTERS)}, sep="/")


def periodic_eval_every(sc) -> int:
  """config.train.eval_every (0 or eval.enabled False: off); never in a 'plain'
  (caption) stage, whose model does not answer questions yet."""
  every = int(sc.train.get("eval_every", 0) or 0)
  if not every or not (sc.get("eval") and sc.eval.get("enabled") and sc.eval.get("sets")):
    return 0
  return 0 if sc.data.template == "plain" else every


def periodic_eval(sc, params, model, mesh) -> dict:
  """The eval sets on their first config.eval.periodic_items items, under the training
  mesh; -> {"eval/<set>/<metric>": value} for metrics.jsonl and TensorBoard."""
  import ml_collections

  ec = ml_collections.ConfigDict(sc.to_dict())
  n = int(sc.eval.get("periodic_items", 200) or 0)
  for spec in ec.eval.sets.values():
    if n and (not spec.get("max_items") or spec.max_items > n):
      spec.max_items = n
  results = evaluate(ec, params, None, model=None, mesh=mesh,
                     rules=rules_from_config(sc.mesh.rules), quiet=True)
  return {f"eval/{name}/{k}": v for name, scores in results.items()
          for k, v in scores.items() if not k.startswith("num_")}


def run_stage(config, name: str, workdir: str, mesh, init_params, preempted: _Preempted):
  """Trains one stage to config.<name>.steps; returns its final params (sharded)."""
  sc = stage_config(config, name)
  stage_dir = paths.join(workdir, name)
  model_dir = paths.join(stage_dir, "model")

  # ---------------- Create model, optimizer and the sharded step ----------------
  setup = setup_stage(sc, mesh)
  model, cfg, abstract_state, shardings = setup.model, setup.cfg, setup.abstract_state, setup.shardings
  total = int(sc.optim.total_steps)
  # The preemption service wants one step count rising over the whole run.
  names = stage_names(config)
  offset = sum(int(stage_config(config, n).optim.total_steps) for n in names[:names.index(name)])
  if paths.exists(paths.join(model_dir, "config.json")):
    print(f"[{name}] finished earlier: loading {model_dir}", flush=True)
    return ckpt_lib.load_params(model_dir, abstract_state["params"])

  # ---------------- Input pipeline; init or restore, onto the devices ----------------
  ckpts = ckpt_lib.Checkpoints(paths.join(stage_dir, "checkpoints"), keep=sc.train.keep,
                               every=sc.train.ckpt_every)
  latest = ckpts.latest_step()
  data_iter, restore_data = open_data(sc, ckpts, latest, name)
  if latest is not None:
    print(f"[{name}] resuming from step {latest} ({ckpts.directory})", flush=True)
    state = ckpts.restore(latest, abstract_state, data_iter if restore_data else None)
  else:
    params = init_params
    if params is None and sc.get("init_from"):
      print(f"[{name}] initialising from {sc.init_from}", flush=True)
      params = ckpt_lib.load_params(sc.init_from, abstract_state["params"], partial=True)
    if params is not None and sc.train.get("fresh_adapters"):
      params = _without_adapters(params)
    if params is not None:
      new = missing_params(params, abstract_state["params"])
      if new:
        print(f"[{name}] {len(new)} parameter(s) new in this stage, initialised fresh: "
              f"{', '.join(new[:6])}{' ...' if len(new) > 6 else ''}", flush=True)
    extras = None
    if setup.search is not None:
      extras = {"eas_scores": jnp.zeros((cfg.llm.num_layers,), jnp.float32)}
    state = init_state(model, cfg, setup.tx, shardings, jax.random.key(sc.train.seed),
                       params=params, extras=extras)

  step_fn = setup.step_fn
  search = setup.search
  if search is not None:
    scores = np.asarray(jax.device_get(state["eas_scores"]))
    print(f"[{name}] EAS search: {search.k} of {cfg.llm.num_layers} layers, candidates "
          f"every {search.every} steps after {search.warmup}; scores {np.round(scores, 4)}",
          flush=True)

  # ---------------- Train loop ----------------
  writer = MetricWriter(workdir, name)
  watch = CompileWatch(name, bool(sc.train.get("fail_on_recompile", False)))
  step = int(jax.device_get(state["step"]))
  bad_steps = jnp.zeros((), jnp.int32)
  loss_sum = jnp.zeros((), jnp.float32)  # on device: the mean since the last log line
  t_last, step_last, tokens_since = time.time(), step, 0
  eval_every = periodic_eval_every(sc)
  print(f"[{name}] {cfg.alignment} model, {step}/{total} steps, global batch "
        f"{sc.data.batch_size}, mesh {dict(mesh.shape)}, {jax.process_count()} process(es)",
        flush=True)
  while step < total:
    batch = next(data_iter)
    if sc.train.blind:
      batch = blind_batch(batch)
    tokens_since += int(batch["text_mask"].sum())
    distributed.forget(f"len/{name}/{step - 2}")  # every host has read it by now
    batch = to_global(batch, mesh, f"{name}/{step}", data_iter.pad_id)
    with watch.step(batch, step + 1):
      if search is None:
        state, metrics = step_fn(state, batch)
      else:
        state, metrics = step_fn(state, batch, eas_search.train_set(search, scores, step))
    if search is not None and eas_search.scoring_due(search, step + 1):
      sets = eas_search.candidate_sets(search, scores, step + 1)
      losses = np.asarray(jax.device_get(setup.losses_fn(state["params"], batch, sets)))
      scores = eas_search.update(scores, sets, losses, search.lr)
      state["eas_scores"] = _replicated(mesh, scores)
    bad_steps = bad_steps + (1 - metrics["finite"].astype(jnp.int32))
    loss_sum = loss_sum + metrics["loss"]
    step += 1
    stop = preempted.check(offset + step)  # read once: the save and the exit agree
    log_now = step % sc.train.log_every == 0 or step == total
    if log_now or step % sc.train.ckpt_every == 0 or stop:
      if int(bad_steps):
        ckpts.close()
        writer.close()
        raise FloatingPointError(
            f"[{name}] non-finite loss or gradient at or before step {step}; the update was "
            f"not applied. Last good checkpoint: step {ckpts.latest_step()} in "
            f"{ckpts.directory}. Lower optim.lr / check the data, then rerun to resume.")
    if log_now:
      m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
      m["loss_mean"] = float(loss_sum) / (step - step_last)  # smoother than one batch's
      loss_sum = jnp.zeros((), jnp.float32)
      dt = time.time() - t_last
      m["steps_per_s"] = (step - step_last) / dt
      m["step_time_ms"] = 1000 * dt / (step - step_last)
      m["tokens_per_s"] = tokens_since / dt
      m["skipped"] = sum(data_iter.skipped.values())
      m["compiles"], m["recompiles"] = watch.compiles, watch.recompiles
      writer.write(step, m)
      if distributed.is_primary():
        print(progress_line(name, step, total, m, (total - step) / m["steps_per_s"]), flush=True)
      if data_iter.skipped:
        print(f"[{name}] skipped examples by kind: {data_iter.skipped}", flush=True)
      if search is not None and distributed.is_primary():
        print(f"[{name}] EAS scores {np.round(scores, 4).tolist()}: top "
              f"{list(eas_search.top_k(scores, search.k))}", flush=True)
      t_last, step_last, tokens_since = time.time(), step, 0
    if eval_every and step % eval_every == 0 and not stop:
      t_eval = time.time()
      scores = periodic_eval(sc, state["params"], model, mesh)
      writer.write(step, scores)
      if distributed.is_primary():
        print(f"[{name}] step {step} eval: " + ", ".join(
            f"{k} {v:.4f}" for k, v in scores.items()) + f" ({time.time() - t_eval:.0f} s)",
            flush=True)
      t_last = time.time() - (t_eval - t_last)  # the eval does not count as step time
    ckpts.save(step, state, data_iter, sc, force=stop or step == total)
    if stop:
      ckpts.close()
      writer.close()
      print(f"[{name}] preempted at step {step}; checkpoint saved", flush=True)
      sys.exit(143)
  ckpts.close()
  writer.close()
  if search is not None:
    # The found set goes into this stage's model config (and, in _main, every later
    # stage's): a resumed run reads it back from there.
    found = eas_search.top_k(scores, search.k)
    sc.model.eas.skip = list(found)
    if distributed.is_primary():
      paths.write_text(paths.join(stage_dir, "search.json"), json.dumps(
          {"skip": list(found), "scores": [float(x) for x in scores]}, indent=2))
      print(f"[{name}] EAS search done: skip layers {list(found)} (scores "
            f"{np.round(scores, 4).tolist()})", flush=True)
  ckpt_lib.save_model(model_dir, state["params"], sc)
  return state["params"]


def main(argv=None):
  backends.prepare_process(argv)  # first: a CPU process restarts with THP malloc (backends/cpu/hugepages.py)
  cli.check_config_path("saisa-train", argv)
  cli.set_help(__name__, cli.CONFIG_HELP)
  app.run(cli.one_line("saisa-train", _main), argv=argv)


def _main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not workdir:
    sys.exit("saisa-train: --workdir is required (where checkpoints, metrics and the model "
             "go; a bucket path works)")
  maybe_initialize_distributed(config)
  workdir = paths.absolute(workdir)  # gs://... stays a URL
  t0 = time.time()

  # ---------------- Set up mesh ----------------
  mesh = make_mesh(config.mesh.shape.to_dict())

  # ---------------- Data that ships with the package ----------------
  if config.get("embedded") and config.embedded.enabled:
    from saisa_jax.data.embedded import prepare_embedded
    config = prepare_embedded(config)

  # ---------------- Every stage runnable; the workdir this model's (before any work) -----
  check_stages(config, jax.process_count())
  check_and_bind(workdir, config, stage_names(config))

  # ---------------- Stages ----------------
  params, preempted = None, _Preempted()
  for name in stage_names(config):
    params = run_stage(config, name, workdir, mesh, params, preempted)
    if stage_config(config, name).train.get("eas_search"):
      found = list(ckpt_lib.load_config(paths.join(workdir, name, "model")).model.eas.skip)
      with config.unlocked():
        config.model.eas.skip = found  # the later stages skip what the search found
  final = stage_config(config, stage_names(config)[-1])
  ckpt_lib.save_model(paths.join(workdir, "model"), params, final)
  if jax.process_index() == 0:
    print(f"curves: {plot_curves(workdir, title=f'{config.model.alignment}')}", flush=True)

  # ---------------- Held-out eval (under the training mesh) ----------------
  if config.get("eval") and config.eval.enabled:
    results = evaluate(final, params, paths.join(workdir, "eval"), mesh=mesh,
                       rules=rules_from_config(final.mesh.rules),
                       model_dir=paths.join(workdir, "model"))
    if distributed.is_primary():
      print(format_table(results), flush=True)
      print(f"training + eval wall time: {(time.time() - t0) / 60:.1f} min", flush=True)
      if "embedded" in results:
        print(f"held-out accuracy: {results['embedded']['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
  main()
