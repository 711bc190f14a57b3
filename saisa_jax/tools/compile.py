"""saisa-compile: ahead-of-time compilation for a TPU slice, on any machine (CPU too).

  pip install -e ".[tpu]"      # libtpu: the TPU compiler (no TPU needed)
  saisa-compile --config configs/saisa_train.py:mesh=fsdp --topology v5p:2x4x4

Compiles the real programs of a config for the devices of `--topology` (from
`jax.experimental.topologies`): the train step of one stage exactly as saisa-train
builds it (`setup_stage`: model, optimizer, state shardings, the donating step), and
the generation programs (`prefill`, one `decode_step`) with the same parameter
shardings. Every input is a ShapeDtypeStruct with its sharding on the topology's mesh:
no weight is ever allocated. Reported per device, saisa beside llava:

  memory    arguments + outputs - donated (aliased) + temporaries + code, from XLA's
            memory analysis, against the chip's HBM (saisa_jax/tools/tpu_specs.py)
  FLOPs     XLA's cost analysis of the same program, unpartitioned, compiled for the CPU
            (remat recompute included), divided by the devices: each chip's share
            under perfect partitioning. XLA counts a loop body once (the layer scans),
            so unless the config already unrolls every scan, the count is extrapolated
            from three fully unrolled compiles with (decoder, tower) layers (1, 1),
            (2, 1) and (1, 2): F = F11 + (L - 1)(F21 - F11) + (V - 1)(F12 - F11), L
            decoder layers, V tower layers run; "bytes accessed" alike (a rough proxy
            for HBM traffic: CPU fusion decisions, not TPU's).
  roofline  max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth): a lower bound on the
            step time that ignores inter-chip traffic and assumes perfect overlap.

Exits non-zero, saying what does not fit, when a program needs more than the HBM of a
device (or the TPU compiler runs out of memory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from saisa_jax.core import cli
from saisa_jax.models.build import dummy_batch
from saisa_jax.backends.attention import is_flash
from saisa_jax.models.config import from_config
from saisa_jax.tools.tpu_specs import chip_spec
from saisa_jax.core.mesh import InMesh, batch_sharding, make_mesh
from saisa_jax.train.stages import stage_config, stage_names
from saisa_jax.train.step import TRAIN_KEYS
from saisa_jax.train import trainer
from saisa_jax.train.trainer import setup_stage

# saisa-train's own --config flag (trainer.py defines it on import; a second definition
# would clash): the same file[:args] and --config.field=value overrides.
_CONFIG = trainer._CONFIG
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:2x4x4 (v5p-64), "
                                "v5e:16x16 (v5e-256), v6e:4x8, v4:2x2x4.")
_STAGE = flags.DEFINE_string("stage", "", "Stage whose train step to compile (default: the "
                             "last of config.stages).")
_ALIGNMENTS = flags.DEFINE_list("alignments", ["saisa", "llava"], "Models to compile.")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "prefill", "decode"], "Programs.")
_TEXT = flags.DEFINE_integer("text", 0, "Text tokens per training sample (0: data.max_len, "
                             "capped so text + visual positions <= data.max_seq_len).")
_INFER_BATCH = flags.DEFINE_integer("infer_batch", 0, "Prefill/decode batch (0: data.batch_size).")
_PROMPT_TEXT = flags.DEFINE_integer("prompt_text", 64, "Prompt text tokens for prefill.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Decode slots in the KV cache.")
_FLOPS = flags.DEFINE_enum("flops", "auto", ["auto", "extrapolate", "unrolled", "none"],
                           "auto: direct if the config unrolls every scan, else extrapolate; "
                           "unrolled: unroll the compiled program itself.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "HBM per device to check against (0: the chip's).")
_JSON = flags.DEFINE_string("json", "", "Also write the report here as JSON.")

FULL_UNROLL = 10**6  # scan_unroll is capped at each stack's depth
GIB = 2.0**30


# ---------------- Devices of the topology ----------------

def prepare_platform() -> None:
  """Compile-only TPU devices next to the CPU backend. Must run before any backend use.

  The TPU backend proper is not wanted (there is no TPU here); libtpu is still loaded by
  `get_topology_desc`, and may be held by another process (ALLOW_MULTIPLE_LIBTPU_LOAD)."""
  if not jax.config.jax_platforms:
    jax.config.update("jax_platforms", "cpu")
    # Silence libtpu's start-up complaints about a missing TPU VM environment.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-16")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(name: str) -> list:
  try:
    import libtpu  # noqa: F401  (the [tpu] extra)
  except ImportError:
    sys.exit("saisa-compile needs libtpu (the TPU compiler; no TPU is needed): "
             "pip install -e \".[tpu]\"  (or pip install \"jax[tpu]==0.10.2\")")
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # noqa: BLE001  (libtpu's errors are plain runtime errors)
    sys.exit(f"saisa-compile: TPU topology {name!r} was refused ({str(e).splitlines()[0]}). "
             "Names look like v5e:2x2 .. v5e:16x16, v5p:2x2x2 .. v5p:8x8x16, v6e:2x4 .. "
             "v6e:16x16, v4:2x2x2 (v5p-64 = 32 chips = v5p:2x4x4; v5e-256 = v5e:16x16)")


def chips_of(devices) -> int:
  coords = {tuple(d.coords) for d in devices if getattr(d, "coords", None) is not None}
  return len(coords) or len(devices)


# ---------------- Abstract inputs on the mesh ----------------

def sharded(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def train_batch(cfg, batch: int, text: int, images: int, mesh) -> dict:
  """The train step's batch (TRAIN_KEYS), sharded over data x fsdp as in saisa-train."""
  b = dummy_batch(cfg, batch, text, images, abstract=True)
  b["targets"] = jax.ShapeDtypeStruct((batch, text), jnp.int32)
  b["loss_mask"] = jax.ShapeDtypeStruct((batch, text), jnp.float32)
  return {k: jax.ShapeDtypeStruct(b[k].shape, b[k].dtype, sharding=batch_sharding(mesh, b[k].ndim))
          for k in TRAIN_KEYS}


def cache_shardings(mesh, cache):
  """kv_cache.KVCache (stacked): k / v are [layers, B, ...] (batch on axis 1), the
  rest [B, ...]."""
  def batch_on(ndim, axis):
    spec = batch_sharding(mesh, ndim - axis).spec
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), *spec))
  return jax.tree.map(lambda a: batch_on(a.ndim, 0), cache).replace(
      k=batch_on(cache.k.ndim, 1), v=batch_on(cache.v.ndim, 1))


@dataclasses.dataclass
class Shapes:
  train_batch: int
  text: int
  images: int
  infer_batch: int
  prompt_text: int
  cache_size: int


def lowerers(sc, mesh, shapes: Shapes) -> dict:
  """-> {program: () -> jax.stages.Lowered} for one stage config (one alignment)."""
  setup = setup_stage(sc, mesh)
  model, cfg = setup.model, setup.cfg
  params = setup.abstract_state["params"]

  def train():
    return setup.step_fn.lower(setup.abstract_state, train_batch(
        cfg, shapes.train_batch, shapes.text, shapes.images, mesh))

  prompt = train_batch(cfg, shapes.infer_batch, shapes.prompt_text, shapes.images, mesh)
  prompt = {k: prompt[k] for k in ("tokens", "positions", "text_mask", "images", "image_slots")}
  prefill_fn = lambda p, b: model.apply({"params": p}, b, shapes.cache_size, method=model.prefill)
  logits_sh = batch_sharding(mesh, 2)
  cache = jax.eval_shape(prefill_fn, params, prompt)[1]
  cache_sh = cache_shardings(mesh, cache)

  def serving(fn, **jit_kw):
    """Prefill / decode as sharded eval jits them (eval/generate.py under a mesh): the
    params as the logical rules place them, the batch over data x fsdp, the mesh and
    rules in context (the activation constraints; flash's shard_map)."""
    return InMesh(jax.jit(fn, **jit_kw), mesh, setup.step_fn.rules)

  def prefill():
    return serving(prefill_fn, out_shardings=(logits_sh, cache_sh)).lower(params, prompt)

  def decode():
    fn = lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode_step)
    tokens = jax.ShapeDtypeStruct((shapes.infer_batch,), jnp.int32,
                                  sharding=batch_sharding(mesh, 1))
    # The cache is donated, as in saisa_jax/eval/generate.py: updated in place.
    return serving(fn, out_shardings=(logits_sh, cache_sh), donate_argnums=2).lower(
        params, tokens, sharded(cache, cache_sh))

  return {"train": train, "prefill": prefill, "decode": decode}


# ---------------- Analysis ----------------

def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                  + out["code"])
  return out


def cost(compiled) -> tuple[float, float]:
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


def variant(sc, **model_fields):
  """A copy of the stage config with model fields changed (and no accumulation loop)."""
  v = sc.copy_and_resolve_references()
  for key, value in model_fields.items():
    if key == "num_layers":
      v.model.llm.num_layers = value
    elif key == "vision_layers_used":  # the tower runs `value` layers, whatever select_layer
      v.model.vision.num_layers = value
      v.model.vision.select_layer = -1
    else:
      v.model[key] = value
  v.optim.accum_steps = 1  # same global batch, same FLOPs, no loop to count once
  return v


def flops_method(sc, requested: str) -> str:
  if requested != "auto":
    return requested
  depth = max(int(sc.model.llm.num_layers), int(sc.model.vision.num_layers))
  unrolled = int(sc.model.get("scan_unroll", 1)) >= depth and int(sc.optim.accum_steps) == 1
  return "direct" if unrolled else "extrapolate"


def compile_program(lower) -> tuple[object, float]:
  t = time.time()
  compiled = lower().compile()
  return compiled, time.time() - t


def out_of_memory(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def analyse_alignment(sc, mesh, shapes: Shapes, programs, method: str, log) -> dict:
  """Compiles each program of one alignment; -> {program: report row}.

  Memory comes from the TPU compile of the real program. FLOPs and bytes come from the
  CPU compiler's count of the unpartitioned program (one device), divided by the
  number of devices: the work each chip does under perfect partitioning. (The TPU
  compiler's own per-device counts of the partitioned 1-/2-layer programs proved
  unreliable at 7B: loops it adds for collective matmuls are counted once, and the
  small unrolled variants can exceed HBM at compile time.)"""
  rows = {}
  main = lowerers(sc, mesh, shapes)
  cpu_mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
  counted = {}
  count_sc = sc
  if is_flash(sc.model.get("attention", "einsum")):
    # The CPU compiler cannot build a TPU kernel: count the same math on the dense
    # path (its bytes include the score matrices the kernel keeps on chip).
    count_sc = variant(sc, attention="einsum")
  if method in ("direct", "unrolled"):
    counted = {"all": lowerers(count_sc, cpu_mesh, shapes)}
  elif method == "extrapolate":
    counted = {(n, m): lowerers(variant(count_sc, num_layers=n, vision_layers_used=m,
                                        scan_unroll=FULL_UNROLL), cpu_mesh, shapes)
               for n, m in ((1, 1), (2, 1), (1, 2))}
  layers = int(sc.model.llm.num_layers)
  tower_layers = from_config(sc.model).vision.layers_used
  devices = mesh.devices.size
  for name in programs:
    row = {}
    try:
      compiled, seconds = compile_program(main[name])
    except Exception as e:  # noqa: BLE001
      if not out_of_memory(e):
        raise
      rows[name] = {"error": str(e).strip().splitlines()[0][:400]}
      log(f"  {name}: the TPU compiler ran out of memory")
      continue
    row["memory"] = memory(compiled)
    row["compile_s"] = seconds
    del compiled
    if method in ("direct", "unrolled"):
      f, b = cost(compile_program(counted["all"][name])[0])
      row["flops"], row["bytes"] = f / devices, b / devices
    elif method == "extrapolate":
      (f11, b11), (f21, b21), (f12, b12) = (
          cost(compile_program(counted[k][name])[0]) for k in ((1, 1), (2, 1), (1, 2)))
      f = f11 + (layers - 1) * (f21 - f11) + (tower_layers - 1) * (f12 - f11)
      b = b11 + (layers - 1) * (b21 - b11) + (tower_layers - 1) * (b12 - b11)
      row["flops"], row["bytes"] = f / devices, b / devices
    rows[name] = row
    log(f"  {name}: compiled in {seconds:.0f} s; {row['memory']['total'] / GIB:.2f} GiB per device"
        + (f", {row['flops'] / 1e12:.4g} TFLOP" if "flops" in row else ""))
  return rows


def param_counts(sc, mesh) -> tuple[float, float]:
  setup = setup_stage(sc, mesh)
  sizes = jax.tree.leaves(jax.tree.map(lambda a: math.prod(a.shape), setup.abstract_state["params"]))
  trainable = jax.tree.leaves(setup.trainable)
  return float(sum(sizes)), float(sum(s for s, t in zip(sizes, trainable) if t))


def add_roofline(row: dict, spec, hbm_gib: float) -> None:
  row["fits"] = "memory" in row and row["memory"]["total"] <= hbm_gib * GIB
  if "flops" in row:
    row["compute_s"] = row["flops"] / (spec.peak_tflops * 1e12)
    row["memory_s"] = row["bytes"] / (spec.hbm_gbps * 1e9)
    row["roofline_s"] = max(row["compute_s"], row["memory_s"])


# ---------------- Report ----------------

_ROWS = [  # (label, program field getter, format)
    ("arguments GiB", lambda r: r["memory"]["arguments"] / GIB, "{:.2f}"),
    ("temporaries GiB", lambda r: r["memory"]["temporaries"] / GIB, "{:.2f}"),
    ("total GiB", lambda r: r["memory"]["total"] / GIB, "{:.2f}"),
    ("HBM used %", lambda r: 100 * r["memory"]["total"] / GIB / r["hbm_gib"], "{:.1f}"),
    ("TFLOP", lambda r: r["flops"] / 1e12, "{:.4g}"),
    ("HBM traffic GB", lambda r: r["bytes"] / 1e9, "{:.4g}"),
    ("compute-bound ms", lambda r: 1e3 * r["compute_s"], "{:.4g}"),
    ("memory-bound ms", lambda r: 1e3 * r["memory_s"], "{:.4g}"),
    ("roofline ms", lambda r: 1e3 * r["roofline_s"], "{:.4g}"),
    ("compile s", lambda r: r["compile_s"], "{:.0f}"),
]


def format_report(report: dict) -> str:
  al = report["alignments"]
  lines = [
      f"saisa-compile {report['config']}  stage {report['stage']}",
      f"topology {report['topology']}: {report['devices']} devices ({report['device_kind']}), "
      f"{report['chips']} chips; mesh {report['mesh']}",
      f"per device: HBM {report['hbm_gib']:.1f} GiB, {report['peak_tflops']:.1f} TFLOP/s bf16, "
      f"{report['hbm_gbps']:.0f} GB/s; FLOPs: {report['flops_method']}",
      f"train:   batch {report['train_batch']} x ({report['images']} x {report['num_visual']} "
      f"visual + {report['text']} text) = {report['seq_positions']} positions per sample",
      f"prefill: batch {report['infer_batch']} x ({report['images']} x {report['num_visual']} "
      f"visual + {report['prompt_text']} text); decode: 1 token, cache {report['cache_size']}",
      "",
      f"{'per device':26s}" + "".join(f"{a:>12s}" for a in al)
      + (f"{al[0] + '/' + al[1]:>14s}" if len(al) == 2 else ""),
  ]
  params = report["params"]
  lines.append(f"{'params (B)':26s}" + "".join(f"{params[a]['total'] / 1e9:12.3f}" for a in al))
  lines.append(f"{'trainable (B)':26s}" + "".join(f"{params[a]['trainable'] / 1e9:12.3f}"
                                                 for a in al))
  for prog in report["programs"]:
    for i, (label, get, fmt) in enumerate(_ROWS):
      vals = []
      for a in al:
        r = dict(report["results"][a][prog], hbm_gib=report["hbm_gib"])
        try:
          vals.append(get(r))
        except (KeyError, TypeError):
          vals.append(None)
      if all(v is None for v in vals) and i:
        continue
      cells = "".join(f"{fmt.format(v) if v is not None else '-':>12s}" for v in vals)
      if len(vals) == 2 and None not in vals and vals[1] and label != "compile s":
        cells += f"{vals[0] / vals[1]:14.3f}"
      lines.append(f"{(prog if i == 0 else ''):9s}{label:17s}{cells}")
  fails = [f"{a} {p}" for a in al for p in report["programs"]
           if not report["results"][a][p]["fits"]]
  lines.append("")
  lines.append("fits: every program fits in HBM" if not fails
               else f"DOES NOT FIT: {', '.join(fails)}")
  return "\n".join(lines)


def default_text(data, num_visual: int) -> int:
  text = int(data.max_len)
  if data.get("max_seq_len"):
    text = min(text, int(data.max_seq_len) - int(data.max_images) * num_visual)
  return text


def main(argv=None):
  cli.check_config_path("saisa-compile", argv)
  cli.set_help(__name__, cli.CONFIG_HELP)
  app.run(cli.one_line("saisa-compile", _main), argv=argv)


def _main(argv):
  del argv
  prepare_platform()
  config = _CONFIG.value
  if not _TOPOLOGY.value:
    sys.exit("saisa-compile: --topology is required (e.g. v5p:2x4x4)")
  stage = _STAGE.value or stage_names(config)[-1]

  # ---------------- Topology and mesh ----------------
  devices = topology_devices(_TOPOLOGY.value)
  chips = chips_of(devices)
  spec = chip_spec(_TOPOLOGY.value).per_device(len(devices) // chips)
  hbm_gib = _HBM_GIB.value or spec.hbm_gib
  mesh = make_mesh(config.mesh.shape.to_dict(), devices)

  # ---------------- Shapes ----------------
  sc = stage_config(config, stage)
  kernel = {"cudnn": "cuDNN's GPU kernel", "cpu": "a C++ kernel for XLA:CPU"}.get(
      sc.model.get("attention", "einsum"))
  if kernel:
    sys.exit(f"saisa-compile: model.attention={sc.model.attention} is {kernel} and cannot "
             "run on a TPU; compile with attention=einsum or attention=flash (the TPU kernel)")
  image_size = sc.model.vision.image_size
  num_visual = (image_size // sc.model.vision.patch_size) ** 2
  images = int(sc.data.max_images)
  text = _TEXT.value or default_text(sc.data, num_visual)
  infer_batch = _INFER_BATCH.value or int(sc.data.batch_size)
  shapes = Shapes(int(sc.data.batch_size), text, images, infer_batch, _PROMPT_TEXT.value,
                  images * num_visual + _PROMPT_TEXT.value + _NEW_TOKENS.value)
  method = flops_method(sc, _FLOPS.value)

  report = dict(
      config=f"--config {config_flags.get_config_filename(flags.FLAGS['config'])}",
      stage=stage, topology=_TOPOLOGY.value, devices=len(devices), chips=chips,
      device_kind=devices[0].device_kind, mesh=dict(mesh.shape), hbm_gib=hbm_gib,
      peak_tflops=spec.peak_tflops, hbm_gbps=spec.hbm_gbps, flops_method=method,
      train_batch=shapes.train_batch, text=text, images=images, num_visual=num_visual,
      seq_positions=text + images * num_visual, infer_batch=infer_batch,
      prompt_text=shapes.prompt_text, cache_size=shapes.cache_size,
      alignments=list(_ALIGNMENTS.value), programs=list(_PROGRAMS.value), params={},
      results={})
  log = functools.partial(print, file=sys.stderr, flush=True)

  # ---------------- Compile ----------------
  for alignment in _ALIGNMENTS.value:
    asc = stage_config(config, stage)
    asc.model.alignment = alignment
    if method == "unrolled":
      asc.model.scan_unroll = FULL_UNROLL
    log(f"[{alignment}] compiling {', '.join(_PROGRAMS.value)} for {_TOPOLOGY.value}")
    total, trainable = param_counts(asc, mesh)
    report["params"][alignment] = {"total": total, "trainable": trainable}
    rows = analyse_alignment(asc, mesh, shapes, _PROGRAMS.value,
                             "direct" if method == "unrolled" else method, log)
    for row in rows.values():
      add_roofline(row, spec, hbm_gib)
    report["results"][alignment] = rows

  # ---------------- Report ----------------
  print(format_report(report), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=1)
  fails = [(a, p, r) for a in report["alignments"] for p, r in report["results"][a].items()
           if not r["fits"]]
  if fails:
    why = "; ".join(
        f"{a} {p} needs {r['memory']['total'] / GIB:.2f} GiB per device"
        if "memory" in r else f"{a} {p}: {r['error']}" for a, p, r in fails)
    sys.exit(f"saisa-compile: does not fit in {hbm_gib:.1f} GiB of HBM per device "
             f"({_TOPOLOGY.value}): {why}. Shard more (mesh.shape fsdp / tensor), rematerialise "
             "(model.remat=full), or lower the per-step batch (optim.accum_steps).")


if __name__ == "__main__":
  main()
