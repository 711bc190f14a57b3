"""saisa-bench: forward, train step, prefill and decode of saisa / naavit / llava, and of
Hugging Face PyTorch LlavaForConditionalGeneration, on the same shapes in one run.
prefill_lm is prefill with the tower's features computed beforehand: the LM side,
which the reference's FLOPs formula counts (the tower is the same work in every stack).
Every stack computes logits only where ours do (text rows; the last row in prefill).

  saisa-bench --presets tiny,smollm2 --out runs/bench

The tiny and smollm2 presets pair an LLM with a small CLIP-shaped tower that gives
LLaVA-1.5's 576 visual tokens (336 px, patch 14), the regime SAISA is built for, sized
to CLIP-L's share of the FLOPs in LLaVA-1.5-7B (tiny_tower64 and smollm2_tower64: the
earlier width-64 tower); "default" is the main job's model (16 visual tokens); "w7b" is Vicuna-7B's width with 4
decoder layers and the real CLIP-L tower, for an accelerator (--dtype bfloat16 --remat
full: the output then gives train-step MFU against the device's bf16 peak, peaks.py,
and the HF peer runs on the GPU when torch sees one). Times are medians over
--repeats calls after --warmup_s of warm-up (spread = 25th..75th percentile).
Forward, prefill and decode run as saisa-eval serves (model.serve_layout: per layer on
CPU, layer_layout.py); the train step scans its stacked layers with --train_unroll
layers a step (default: all). FLOPs are XLA's count of the same function compiled with every scan unrolled
(XLA counts a loop body once);
memory is XLA's arguments + temporaries of the timed program. The train step is the
stage-2 recipe's (LLM + projector(s) trained, CLIP tower frozen; --train_tower trains it
too), in both stacks. Like the other entry points it restarts itself with glibc's
hugetlb malloc (saisa_jax/backends/cpu/hugepages.py); the PyTorch peers run each in a child
process with the default malloc (faster for it); on an accelerator they all run first,
with the device to themselves. --rounds N benches every stack N times, the order
reversed each round (on a CPU the peer takes its turn with ours); the table pools the
rounds' calls, the ratios are taken within each round (bench_rounds.py).
--alignments saisa,llava skips naavit. Writes bench.json, bench.md and bench.png
(bench.json's meta.host: the CPU, its ISA and one matmul's GFLOP/s in XLA and torch,
host_probe.py: runs compare host to host), and ends with

  LM side (tower features given): prefill saisa/llava R; saisa speedup vs HF Llava S
  prefill saisa/llava: R          (the largest over the presets)
  train step saisa/llava: R       (the largest over the presets)
  saisa speedup vs HF Llava: S    (HF prefill time / saisa prefill time, the smallest)

each the median over rounds, then (with several presets or rounds) each preset's value
and the rounds' range.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from saisa_jax import backends
from saisa_jax.backends.cpu import hugepages
from saisa_jax import presets
from saisa_jax.models.build import build
from saisa_jax.backends.serving import for_serving, serving_layout
from saisa_jax.tools import bench_rounds
from saisa_jax.tools import host_probe
from saisa_jax.tools.host_probe import usable_cpus
from saisa_jax.tools.peaks import peak_tflops
from saisa_jax.train.optim import make_optimizer
from saisa_jax.train.step import make_train_step

_PRESETS = flags.DEFINE_list("presets", ["tiny", "smollm2"], "Bench presets.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size.")
_TEXT = flags.DEFINE_integer("text", 64, "Text tokens per sample (after the image).")
_DECODE = flags.DEFINE_integer("decode_steps", 16, "Decode steps timed.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per measurement.")
_OUT = flags.DEFINE_string("out", "runs/bench", "Output folder.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time HF PyTorch Llava.")
_TRAIN_TOWER = flags.DEFINE_bool(
    "train_tower", False, "Train step also trains the CLIP tower. Off: the stage-2 recipe "
    "of SAISA and LLaVA-1.5 (LLM + projector(s) trained, tower frozen), in both stacks.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of both stacks (params stay float32 in JAX).")
_REMAT = flags.DEFINE_string("remat", "none", "model.remat of the timed train step.")
_LLM_LAYERS = flags.DEFINE_integer("llm_layers", 0, "Decoder layers (0: the preset's).")
_TRAIN_UNROLL = flags.DEFINE_string(
    "train_unroll", "full", "Layers unrolled per scan step in the timed train step: 'full' "
    "(every layer; on XLA:CPU a scanned backward stacks every layer's residuals into "
    "zero-filled buffers and slices them back: smollm2 llava 4459 -> 4089 ms, tiny 50 "
    "-> 38 ms unrolled) or a number (1: the scan, as configs/saisa.py trains on TPU).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Times every stack is benched, HF's peer included, the order reversed "
    "each round; the summary ratios are taken within each round, then their median "
    "(bench_rounds.py: on a machine whose speed drifts, 3 rounds give steadier ratios).")
_WARMUP_S = flags.DEFINE_float(
    "warmup_s", 1.0, "Seconds of untimed calls (at least 2) before each measurement, in "
    "both stacks: on this CPU a fresh program's first ~0.5 s of calls run up to 2x slow. "
    "0 for a smoke run, whose times mean nothing.")
_ALIGNMENTS = flags.DEFINE_list(
    "alignments", ["saisa", "naavit", "llava"], "Stacks timed (saisa and llava always: "
    "the summary lines compare them); dropping naavit saves its compiles on a GPU.")
_EAS_SKIP = flags.DEFINE_string(
    "eas_skip", "", "EAS: also time saisa+eas and llava+eas, these decoder layers' "
    "attention skipped (e.g. 1 or 20-29; PIA width 256 or d/2, zero-initialised).")
_ATTENTION = flags.DEFINE_string(
    "attention", "auto", "model.attention (see models/config.py); auto: cpu (the fused C++ "
    "kernel) on a CPU backend in float32 when a C++ compiler is found, else einsum.")

WARMUP_S = 1.0  # seconds of warm-up in timed(); --warmup_s sets it (and the HF child's)

# Parameters the train step updates (optim.trainable), as configs/saisa_train.py stage 2.
STAGE2_TRAINABLE = "^(decoder|projector)"


def trainable_pattern(train_tower: bool) -> str:
  return ".*" if train_tower else STAGE2_TRAINABLE

def clip_grid_tower(width: int, layers: int, heads: int) -> dict:
  """A CLIP-shaped tower on CLIP ViT-L/14-336's patch grid (336 px, patch 14): LLaVA-1.5's
  576 visual tokens, at a width a CPU can run."""
  return dict(image_size=336, patch_size=14, hidden_size=width, intermediate_size=4 * width,
              num_layers=layers, num_heads=heads, layer_norm_eps=1e-5, select_layer=-1)


# The tiny and smollm2 towers are sized so that the tower's share of llava's forward
# FLOPs is CLIP-L's in LLaVA-1.5-7B (4.1% by the reference formula, flops_formula.py;
# tiny 3.7%, smollm2 4.0%): SAISA saves on the language side only, so a tower out of
# proportion moves the saisa/llava ratio away from what a 7B user gets.
# tests/test_bench_presets.py holds them to it. The *_tower64 presets keep the
# earlier bench tower (width 64, 2 layers): 26% of llava's FLOPs at tiny, 0.2% at
# smollm2; README gives their last numbers beside the current presets'.
TOWER64 = clip_grid_tower(64, 2, 4)
# preset -> (LLM preset, tower, decoder layers or None for the LLM's); "default" is the
# main job's model (16 visual tokens); "w7b" is Vicuna-7B's width with 4 decoder layers
# and the real CLIP ViT-L/14-336 tower, for an accelerator's MFU (--dtype bfloat16).
PRESETS = {"tiny": ("tiny", clip_grid_tower(16, 1, 1), None),
           "smollm2": ("smollm2_135m", clip_grid_tower(192, 9, 3), None),
           "tiny_tower64": ("tiny", TOWER64, None),
           "smollm2_tower64": ("smollm2_135m", TOWER64, None),
           "default": ("tiny", presets.TOWERS["tiny"], None),
           "w7b": ("vicuna7b", presets.TOWERS["clip_l14_336"], 4)}
ALIGNMENTS = ("saisa", "naavit", "llava")


def resolve_attention(attention: str, preset: str, dtype: str) -> str:
  """--attention auto -> the fastest implementation this backend has for the preset."""
  if attention != "auto":
    return attention
  from saisa_jax.backends.cpu import attention as cpu_attention
  llm_name, tower, _ = PRESETS[preset]
  llm = presets.lookup(presets.LLMS, llm_name, "llm")
  dims = (llm["hidden_size"] // llm["num_heads"], tower["hidden_size"] // tower["num_heads"])
  if jax.default_backend() != "cpu" or dtype != "float32" or not all(
      cpu_attention.supported_head_dim(d) for d in dims):
    return "einsum"
  try:
    cpu_attention.ensure_registered()
  except RuntimeError as e:
    print(f"[bench] --attention auto: einsum ({str(e).splitlines()[0]})", flush=True)
    return "einsum"
  return "cpu"


def model_config(preset: str, alignment: str, unrolled: bool = False, dtype: str = "float32",
                 remat: str = "none", llm_layers: int = 0, attention: str = "einsum",
                 scan_unroll: int = 1, eas_skip=()) -> ml_collections.ConfigDict:
  """`scan_unroll` for timing (serving uses model.serve_layout, per layer on CPU:
  layer_layout.py); `unrolled` for counting FLOPs, with
  remat off there so the count is the model's FLOPs, not the recomputation's, and
  einsum attention (XLA counts nothing inside a cuDNN or Pallas kernel).
  (Unrolling is also slower on XLA:CPU: each layer's weights get sliced out as copies.)"""
  llm_name, tower, layers = PRESETS[preset]
  llm = presets.lookup(presets.LLMS, llm_name, "llm")
  llm["num_layers"] = llm_layers or layers or llm["num_layers"]
  depth = max(llm["num_layers"], tower["num_layers"])
  unroll = depth if unrolled else min(scan_unroll, depth)
  alignment, _, eas = alignment.partition("+")  # "saisa+eas": EAS skips eas_skip
  out = ml_collections.ConfigDict(dict(
      alignment=alignment, dtype=dtype, remat="none" if unrolled else remat,
      scan_unroll=unroll, attention="einsum" if unrolled else attention, llm=llm,
      vision=dict(tower)))
  if eas:
    out.eas = dict(enabled=True, skip=list(eas_skip),
                   width=min(256, llm["hidden_size"] // 2))
  return out


def bench_batch(cfg, batch: int, text: int, lead: int = 8) -> dict:
  """[lead text][image][text - lead]: a system prompt, the image, the question."""
  v = cfg.num_visual
  pos = np.concatenate([np.arange(lead), lead + v + np.arange(text - lead)]).astype(np.int32)
  rng = np.random.default_rng(0)
  return {
      "tokens": rng.integers(3, cfg.llm.vocab_size, (batch, text)).astype(np.int32),
      "positions": np.broadcast_to(pos, (batch, text)).copy(),
      "text_mask": np.ones((batch, text), bool),
      "images": rng.normal(size=(batch, 1, cfg.vision.image_size, cfg.vision.image_size, 3)
                           ).astype(np.float32),
      "image_slots": np.full((batch, 1), lead, np.int32),
      "targets": rng.integers(3, cfg.llm.vocab_size, (batch, text)).astype(np.int32),
      "loss_mask": np.ones((batch, text), np.float32),
  }


def timed(fn, repeats: int, warmup: int = 2, setup=None, sync=None) -> dict:
  """fn() -> result (blocked on; or `sync()` after it, for PyTorch on a GPU). Median and
  quartiles in ms, and every timed call's ms (`calls`: rounds pool them). `setup()`,
  untimed, runs before every call. Warm-up runs at least `warmup` calls and WARMUP_S
  seconds: on this CPU the first ~0.5 s of calls of a fresh program run up to 2x slow."""
  def call():
    jax.block_until_ready(fn())
    if sync:
      sync()
  start, calls = time.perf_counter(), 0
  while calls < warmup or time.perf_counter() - start < WARMUP_S:
    if setup:
      setup()
    call()
    calls += 1
  times = []
  for _ in range(repeats):
    if setup:
      setup()
    t = time.perf_counter()
    call()
    times.append(1000 * (time.perf_counter() - t))
  return {**bench_rounds.summarize(times), "calls": times}


def host_cpu():
  """The host's CPU device, or None where JAX has no CPU backend (JAX_PLATFORMS=cuda)."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return None


def _compiled_stats(jitted, args, counted, counted_args=None) -> dict:
  """Memory of `jitted` (the timed program) on `args`, FLOPs of `counted` (its
  unrolled, stacked twin) on `counted_args` (default: `args`). The twin is compiled for
  the host CPU whatever the backend: the count is the program's, and XLA:GPU autotunes
  every matmul of a compile (the 7B-width twins took minutes on an H100), while the
  lowered program's own cost analysis gives no FLOPs there."""
  mem = jitted.lower(*args).compile().memory_analysis()
  counted_args = args if counted_args is None else counted_args
  cpu = host_cpu()
  if cpu is not None:  # abstract values placed on it: nothing is copied
    where = jax.sharding.SingleDeviceSharding(cpu)
    counted_args = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), counted_args)
  with jax.default_device(cpu):
    cost = counted.lower(*counted_args).compile().cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"gflops": float(cost.get("flops", 0.0)) / 1e9,
          "mem_mb": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20 if mem else None}


def bench_jax(preset: str, alignment: str, batch: int, text: int, decode_steps: int,
              repeats: int, train_tower: bool = False, train_unroll: str = "full",
              stats: bool = True, **model_kw) -> dict:
  """model_kw: dtype, remat, llm_layers, attention (model_config). Forward, prefill
  and decode run in the serving layout (backends/serving.for_serving), the train step in
  the stacked layout with `train_unroll` layers unrolled per scan step. stats=False
  (a later round) times only: no FLOP count, no memory analysis."""
  compiled_stats = _compiled_stats if stats else lambda *args: {}
  model, cfg = build(model_config(preset, alignment, **model_kw))
  counted, _ = build(model_config(preset, alignment, unrolled=True, **model_kw))
  unroll = 1 << 30 if train_unroll == "full" else int(train_unroll)
  trained = backends.for_training(
      build(model_config(preset, alignment, scan_unroll=unroll, **model_kw))[0])
  data = {k: jnp.asarray(v) for k, v in bench_batch(cfg, batch, text).items()}
  infer = {k: v for k, v in data.items() if k not in ("targets", "loss_mask")}
  params = jax.jit(model.init)(jax.random.key(0), infer)["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  out = {}
  served, sparams = for_serving(model, params)

  fwd = jax.jit(lambda p, b: served.apply({"params": p}, b))
  fwd_u = jax.jit(lambda p, b: counted.apply({"params": p}, b))
  out["forward"] = {**timed(lambda: fwd(sparams, infer), repeats),
                    **compiled_stats(fwd, (sparams, infer), fwd_u, (params, infer))}

  size = text + cfg.num_visual + decode_steps
  prefill = jax.jit(lambda p, b: served.apply({"params": p}, b, size, method=served.prefill))
  prefill_u = jax.jit(lambda p, b: counted.apply({"params": p}, b, size, method=counted.prefill))
  out["prefill"] = {**timed(lambda: prefill(sparams, infer), repeats),
                    **compiled_stats(prefill, (sparams, infer), prefill_u, (params, infer))}

  # The LM side alone: the tower's features computed beforehand (what the reference's
  # FLOPs formula counts; the tower is the same program in every stack).
  feats = jax.jit(lambda p, b: served.apply({"params": p}, b, method=served.tower_features)
                  )(sparams, infer)
  lm_batch = {k: v for k, v in infer.items() if k != "images"}
  prefill_lm = jax.jit(lambda p, b, f: served.apply({"params": p}, b, size, features=f,
                                                    method=served.prefill))
  prefill_lm_u = jax.jit(lambda p, b, f: counted.apply({"params": p}, b, size, features=f,
                                                       method=counted.prefill))
  out["prefill_lm"] = {**timed(lambda: prefill_lm(sparams, lm_batch, feats), repeats),
                       **compiled_stats(prefill_lm, (sparams, lm_batch, feats), prefill_lm_u,
                                        (params, lm_batch, feats))}

  # As saisa-eval runs it: the cache is donated and updated in place.
  decode = jax.jit(lambda p, t, c: served.apply({"params": p}, t, c,
                                                method=served.decode_step), donate_argnums=2)
  decode_u = jax.jit(lambda p, t, c: counted.apply({"params": p}, t, c,
                                                   method=counted.decode_step))
  logits, cache = prefill(sparams, infer)
  tokens = jnp.argmax(logits, -1).astype(jnp.int32)
  stacked_cache = jax.eval_shape(prefill_u, params, infer)[1]
  stats = compiled_stats(decode, (sparams, tokens, cache), decode_u,
                         (params, tokens, stacked_cache))
  fresh = {}

  def new_cache():  # each run starts from the prefill's cache (a run donates its copy)
    fresh["cache"] = jax.block_until_ready(jax.tree.map(jnp.copy, cache))

  def decode_run():
    c, t = fresh.pop("cache"), tokens
    for _ in range(decode_steps):
      lg, c = decode(sparams, t, c)
      t = jnp.argmax(lg, -1).astype(jnp.int32)
    return t
  run = timed(decode_run, max(2, repeats // 2), warmup=1, setup=new_cache)
  out["decode"] = {**per_step(run, decode_steps), **stats}
  # The train step last, as in the HF peer: its large temporaries would otherwise be
  # the state every later program starts from (smollm2 llava prefill 1.29 s after it,
  # 1.16 s alone).
  optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=10, warmup_ratio=None, final_lr_frac=0.1, b1=0.9, b2=0.98,
      eps=1e-8, weight_decay=0.0, clip_norm=1.0, total_steps=1000,
      trainable=trainable_pattern(train_tower)))
  tx, lr_fn, trainable = make_optimizer(optim, params)
  step = jax.jit(make_train_step(trained, tx, lr_fn, trainable), donate_argnums=0)
  step_u = jax.jit(make_train_step(counted, tx, lr_fn, trainable), donate_argnums=0)
  # The step donates its state, params included: nothing runs after it (a copy would
  # hold a second set of weights through the step).
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  stats = compiled_stats(step, (state, data), step_u)
  holder = {"state": state}

  def one_step():
    holder["state"], m = step(holder["state"], data)
    return m["loss"]
  out["train_step"] = {**timed(one_step, repeats), **stats}

  return rates(out, batch)


def per_step(run: dict, steps: int) -> dict:
  """A timed run of `steps` decode steps -> ms per step (median, quartiles, calls)."""
  return {"ms": run["ms"] / steps, "p25": run["p25"] / steps, "p75": run["p75"] / steps,
          "calls": [t / steps for t in run["calls"]]}


def rates(out: dict, batch: int) -> dict:
  """Adds what follows from the times (again after rounds are pooled): achieved
  GFLOP/s, MFU on an accelerator, decode tokens/s."""
  peak = peak_tflops(jax.devices()[0].device_kind)
  for op, v in out.items():
    if not isinstance(v, dict):
      continue
    if op == "decode":
      v["tokens_per_s"] = batch / (v["ms"] / 1000)
    v["gflop_per_s"] = v["gflops"] / (v["ms"] / 1000) if v.get("gflops") else None
    # Model FLOPs (counted without remat) over the device's dense bf16 peak.
    v["mfu"] = v["gflop_per_s"] / (1000 * peak) if peak and v["gflop_per_s"] else None
  return out


def bench_torch(preset: str, batch: int, text: int, decode_steps: int, repeats: int,
                train_tower: bool = False, dtype: str = "float32", llm_layers: int = 0) -> dict:
  """HF LlavaForConditionalGeneration on the same shapes (what a user would pick), on
  the GPU when torch sees one."""
  import torch
  import transformers

  torch.set_num_threads(usable_cpus())  # as many as XLA's pool, under taskset too
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else None
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  mc = model_config(preset, "llava", llm_layers=llm_layers)
  llm, vis = mc.llm, mc.vision
  image_token = llm.vocab_size  # one extra id for <image>
  text_cfg = transformers.LlamaConfig(
      vocab_size=llm.vocab_size + 1, hidden_size=llm.hidden_size,
      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      rms_norm_eps=llm.rms_eps, tie_word_embeddings=llm.tie_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta})
  vis_cfg = transformers.CLIPVisionConfig(
      hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
      num_hidden_layers=vis.num_layers, num_attention_heads=vis.num_heads,
      image_size=vis.image_size, patch_size=vis.patch_size)
  # select_layer counts like HF's hidden_states index (see models/clip.py).
  cfg = transformers.LlavaConfig(vision_config=vis_cfg, text_config=text_cfg,
                                 image_token_index=image_token,
                                 vision_feature_layer=vis.select_layer,
                                 vision_feature_select_strategy="default")
  with torch.device(device):  # built where it runs: a 7B-width init on the host is slow
    model = transformers.LlavaForConditionalGeneration(cfg).to(dtype=tdtype)
  nv = (vis.image_size // vis.patch_size) ** 2
  rng = np.random.default_rng(0)
  lead = 8
  ids = rng.integers(3, llm.vocab_size, (batch, text))
  ids = np.concatenate([ids[:, :lead], np.full((batch, nv), image_token), ids[:, lead:]], 1)
  ids = torch.from_numpy(ids).long().to(device)
  pixels = torch.from_numpy(rng.normal(size=(batch, 3, vis.image_size, vis.image_size))
                            .astype(np.float32)).to(device=device, dtype=tdtype)
  # Logits only where ours compute them (HF computes all rows' by default): the text
  # rows in forward and train step, the last row in prefill (as HF's generate asks).
  text_rows = (ids[0] != image_token).nonzero().squeeze(1)  # every row has one layout
  targets = torch.from_numpy(rng.integers(3, llm.vocab_size, (batch, text))).long().to(device)
  out = {}
  model.eval()
  with torch.no_grad():
    out["forward"] = timed(lambda: model(input_ids=ids, pixel_values=pixels, use_cache=False,
                                         logits_to_keep=text_rows).logits, repeats, sync=sync)
    out["prefill"] = timed(lambda: model(input_ids=ids, pixel_values=pixels, use_cache=True,
                                         logits_to_keep=1).logits, repeats, sync=sync)
    # The LM side: the tower's features (hidden_states[select_layer], CLS dropped)
    # computed beforehand; projector, merge and LM timed.
    feats = model.model.vision_tower(pixels, output_hidden_states=True
                                     ).hidden_states[vis.select_layer][:, 1:]
    image_rows = (ids == image_token)[..., None]
    embed = model.get_input_embeddings()

    def prefill_lm():
      vis_emb = model.model.multi_modal_projector(feats)
      emb = embed(ids).masked_scatter(image_rows, vis_emb)
      return model(inputs_embeds=emb, use_cache=True, logits_to_keep=1).logits
    out["prefill_lm"] = timed(prefill_lm, repeats, sync=sync)
    res = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)

    def decode_run():
      past, tok = res.past_key_values, res.logits[:, -1:].argmax(-1)
      import copy
      past = copy.deepcopy(past)
      for _ in range(decode_steps):
        o = model(input_ids=tok, past_key_values=past, use_cache=True)
        past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
      return tok
    run = timed(decode_run, max(2, repeats // 2), warmup=1, sync=sync)
    out["decode"] = per_step(run, decode_steps)
  model.train()
  if not train_tower:  # stage 2: the CLIP tower is frozen (no grads, not in the optimizer)
    model.model.vision_tower.requires_grad_(False)
  trained = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trained, lr=1e-4)

  def train_step():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=text_rows).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, 1.0)
    opt.step()
    return loss.detach()
  out["train_step"] = timed(train_step, repeats, sync=sync)
  out["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  return out


def peer_env() -> dict:
  """The environment of a PyTorch child: ours less the hugetlb malloc tunable. The child
  runs its code directly: no entry point, no re-exec."""
  env = dict(os.environ)
  tunables = hugepages.tunables_without_hugepages(env.pop("GLIBC_TUNABLES", None))
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  return env


def probe_host(with_torch: bool) -> dict:
  """host_probe.py's record: the CPU, its ISA, and one float32 matmul's GFLOP/s in XLA
  (on the host CPU) and, with the peer, in torch (in a child, as the peer runs)."""
  probe = {**host_probe.cpu_info(), "matmul_shape": list(host_probe.SHAPE),
           "matmul_gflops": {}}
  cpu = host_cpu()
  if cpu is not None:
    with jax.default_device(cpu):
      probe["matmul_gflops"]["xla"] = host_probe.xla_matmul_gflops()
  if with_torch:
    probe["matmul_gflops"].update(host_probe.torch_matmul_gflops_process(peer_env()))
  return probe


def bench_torch_process(preset: str, batch: int, text: int, decode_steps: int, repeats: int,
                        train_tower: bool = False, dtype: str = "float32",
                        llm_layers: int = 0) -> dict:
  """bench_torch in its own process, with the malloc settings a PyTorch user has: the
  hugetlb tunable that speeds up XLA:CPU made the HF train step ~19% slower here
  (5.27 -> 6.27 s at smollm2), and the JAX runtime's threads stay out of its way."""
  env = peer_env()
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "torch.json")
    code = ("import json, sys; from saisa_jax.tools import bench; "
            "args = json.loads(sys.argv[1]); bench.WARMUP_S = args.pop(); "
            "json.dump(bench.bench_torch(*args), open(sys.argv[2], 'w'))")
    args = json.dumps([preset, batch, text, decode_steps, repeats, train_tower, dtype,
                       llm_layers, WARMUP_S])
    proc = subprocess.run([sys.executable, "-c", code, args, out], env=env)
    if proc.returncode:
      raise SystemExit(f"saisa-bench: the HF PyTorch peer failed at preset {preset!r} "
                       f"(exit {proc.returncode}; its error is above); --notorch skips it")
    with open(out) as f:
      return json.load(f)


OPS = ("forward", "train_step", "prefill", "prefill_lm", "decode")


def markdown(results: dict) -> str:
  lines = ["| preset | model | " + " | ".join(f"{o} ms" for o in OPS) +
           " | prefill GFLOPs | prefill GFLOP/s | train GFLOPs | train mem MB |",
           "|---" * (6 + len(OPS)) + "|"]
  for preset, by_model in results.items():
    for name, r in by_model.items():
      cells = [f"{r[o]['ms']:.1f} ({r[o]['p25']:.1f}-{r[o]['p75']:.1f})" for o in OPS]
      pf, tr = r["prefill"], r["train_step"]
      extra = [f"{pf['gflops']:.2f}" if pf.get("gflops") else "-",
               f"{pf['gflop_per_s']:.1f}" if pf.get("gflop_per_s") else "-",
               f"{tr['gflops']:.2f}" if tr.get("gflops") else "-",
               f"{tr['mem_mb']:.0f}" if tr.get("mem_mb") else "-"]
      lines.append(f"| {preset} | {name} | " + " | ".join(cells + extra) + " |")
  return "\n".join(lines)


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
  for ax, (preset, by_model) in zip(axes[0], results.items()):
    names = list(by_model)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
      ax.bar(np.arange(len(OPS)) + i * width, [by_model[name][o]["ms"] for o in OPS], width,
             label=name)
    ax.set_xticks(np.arange(len(OPS)) + 0.4 - width / 2, OPS)
    ax.set(title=preset, ylabel="ms (median)", yscale="log")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  backends.prepare_process(argv)  # first: a CPU process restarts with THP malloc (backends/cpu/hugepages.py)
  app.run(_main, argv=argv)


def _main(argv):
  del argv
  global WARMUP_S
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  WARMUP_S = _WARMUP_S.value
  alignments = [a for a in ALIGNMENTS if a in _ALIGNMENTS.value]  # saisa first
  unknown = set(_ALIGNMENTS.value) - set(ALIGNMENTS)
  eas_skip = []
  if _EAS_SKIP.value:
    from saisa_jax.tools.flops_formula import parse_layers
    depth = min(model_config(p, "llava", llm_layers=_LLM_LAYERS.value).llm.num_layers
                for p in _PRESETS.value)
    eas_skip = parse_layers(_EAS_SKIP.value, depth)
    alignments += ["saisa+eas", "llava+eas"]
  if unknown or not {"saisa", "llava"} <= set(alignments):
    raise SystemExit(f"--alignments {','.join(_ALIGNMENTS.value)}: name saisa and llava "
                     f"(the summary lines compare them), optionally naavit; "
                     f"unknown: {sorted(unknown) or 'none'}")
  os.makedirs(_OUT.value, exist_ok=True)
  for preset in _PRESETS.value:
    if preset not in PRESETS:
      raise SystemExit(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
  if _ROUNDS.value < 1:
    raise SystemExit(f"--rounds {_ROUNDS.value}: give 1 or more")
  rounds = _ROUNDS.value
  # Which host this ran on: bench runs are comparable host to host only (host_probe.py).
  host = probe_host(_TORCH.value)
  print("[bench] " + host_probe.describe(host), flush=True)
  runs = {p: {**{a: [] for a in alignments}, **({"hf_llava": []} if _TORCH.value else {})}
          for p in _PRESETS.value}

  def peer(preset, r):
    print(f"[bench] {preset} hf_llava (PyTorch), round {r + 1}/{rounds}", flush=True)
    runs[preset]["hf_llava"].append(bench_torch_process(
        preset, _BATCH.value, _TEXT.value, _DECODE.value, _REPEATS.value,
        _TRAIN_TOWER.value, _DTYPE.value, _LLM_LAYERS.value))

  # The PyTorch peer first, in its own process, before this process opens the
  # accelerator: on a GPU, JAX's allocator keeps what it took until the process exits,
  # so there every peer round runs now; on a CPU the peers take turns with our stacks.
  if _TORCH.value:
    peer(_PRESETS.value[0], 0)
    if runs[_PRESETS.value[0]]["hf_llava"][0].get("device", "cpu") != "cpu":
      for preset in _PRESETS.value:
        for r in range(len(runs[preset]["hf_llava"]), rounds):
          peer(preset, r)
  attention = {}
  for preset in _PRESETS.value:
    attention[preset] = resolve_attention(_ATTENTION.value, preset, _DTYPE.value)
    for r in range(rounds):
      forward = r % 2 == 0  # even rounds: HF, saisa, (naavit,) llava; odd: the reverse
      due = _TORCH.value and len(runs[preset]["hf_llava"]) <= r
      if due and forward:
        peer(preset, r)
      for alignment in alignments if forward else alignments[::-1]:
        print(f"[bench] {preset} {alignment} (attention {attention[preset]}), "
              f"round {r + 1}/{rounds}", flush=True)
        runs[preset][alignment].append(bench_jax(
            preset, alignment, _BATCH.value, _TEXT.value, _DECODE.value, _REPEATS.value,
            _TRAIN_TOWER.value, _TRAIN_UNROLL.value, stats=r == 0, dtype=_DTYPE.value,
            remat=_REMAT.value, llm_layers=_LLM_LAYERS.value, attention=attention[preset],
            eas_skip=eas_skip))
      if due and not forward:
        peer(preset, r)
  results = {p: {m: rates(bench_rounds.pool(rs), _BATCH.value) for m, rs in by_model.items()}
             for p, by_model in runs.items()}
  kind = jax.devices()[0].device_kind
  for by_model in results.values():  # HF runs the llava model: the same model FLOPs
    hf, ours = by_model.get("hf_llava"), by_model["llava"]
    if not hf or hf.get("device", "cpu") == "cpu":
      continue  # a CPU peer has no accelerator peak to compare with
    for op in OPS:
      if ours[op].get("mfu"):
        hf[op]["mfu"] = ours[op]["mfu"] * ours[op]["ms"] / hf[op]["ms"]
  meta = {"device": kind, "cpu_count": usable_cpus(), "peak_tflops": peak_tflops(kind),
          "dtype": _DTYPE.value, "remat": _REMAT.value, "attention": attention,
          "rounds": rounds, "repeats": _REPEATS.value, "eas_skip": eas_skip,
          "train_unroll": _TRAIN_UNROLL.value, "warmup_s": WARMUP_S,
          "serve_layout": serving_layout(build(model_config(next(iter(results)), "saisa"))[1]),
          "llm_layers": {p: model_config(p, "llava", llm_layers=_LLM_LAYERS.value
                                         ).llm.num_layers for p in results},
          "batch": _BATCH.value, "text": _TEXT.value,
          "trainable": trainable_pattern(_TRAIN_TOWER.value),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "host": host,
          "visual": {p: (PRESETS[p][1]["image_size"] // PRESETS[p][1]["patch_size"]) ** 2
                     for p in results}}
  # Ratios within each round, the worst preset's, then their median (bench_rounds.py).
  summary = bench_rounds.summary(runs, _TORCH.value)
  with open(os.path.join(_OUT.value, "bench.json"), "w") as f:
    json.dump({"meta": meta, "summary": summary, "results": results}, f, indent=1)
  table = markdown(results)
  with open(os.path.join(_OUT.value, "bench.md"), "w") as f:
    f.write(table + "\n")
  plot(results, os.path.join(_OUT.value, "bench.png"))
  print(table)
  print(host_probe.describe(host))
  for preset, by_model in results.items():
    if by_model["saisa"]["train_step"].get("mfu"):
      print(f"{preset} on {kind}: train-step MFU " + ", ".join(
          f"{n} {r['train_step']['mfu']:.3f}" for n, r in by_model.items()
          if r["train_step"].get("mfu")) + "; decode tokens/s " + ", ".join(
          f"{n} {r['decode']['tokens_per_s']:.0f}" for n, r in by_model.items()))
  for line in bench_rounds.lines(summary):
    print(line)


if __name__ == "__main__":
  main()
