"""saisa-import: Hugging Face / released checkpoints -> a saisa-jax model directory.

  saisa-import --checkpoint SAISA_OR_LLAVA_DIR --out DIR [--vision-tower CLIP_DIR]
  saisa-import --llm LM_DIR_OR_GGUF --vision-tower CLIP_DIR --alignment saisa --out DIR
  saisa-import --llm SmolLM2.gguf --vision-preset tiny --alignment saisa --out DIR

What it reads (safetensors or GGUF only; pickle files are refused):
  released SAISA  config.json model_type llava_llama, per-layer model.layers.{l}.mm_projector
                  (alignment saisa); the tower inside the weights or at mm_vision_tower
  LLaVA-1.5       model_type llava_llama with the global model.mm_projector (llava)
  HF Llava        model_type llava (LlavaForConditionalGeneration, either name spelling)
  an LM           LLaMA / Mistral / SmolLM2 (LlamaForCausalLM names) or a GGUF file;
                  with --vision-tower (a CLIPVisionModel or CLIPModel directory) or
                  --vision-preset (a fresh tower); projectors absent from the source are
                  freshly initialised.
What it writes: DIR/params (orbax) + DIR/config.json (model, template, data.tokenizer,
`imported`: where every tensor came from, which saisa-export reuses for the tensors
our params do not hold) + DIR/tokenizer + DIR/generation_config.json when available.

Streaming: one leaf at a time is read from the files and placed on the mesh
(jax.make_array_from_callback, the callback reading only that tensor); a stacked
leaf is filled layer by layer into a donated device buffer, so besides the model
itself the process holds at most one layer's tensor (twice) or one unstacked leaf.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from saisa_jax.core.progress import Progress
from saisa_jax import presets
from saisa_jax.convert import layout
from saisa_jax.convert.gguf_import import GGUFSource, find_gguf
from saisa_jax.convert.safetensors_io import SafetensorsDir
from saisa_jax.models.build import build
from saisa_jax.models.clip import VisionTower
from saisa_jax.models.config import ModelConfig, from_config
from saisa_jax.models.projectors import MLPProjector
from saisa_jax.core import checkpoint as ckpt_lib
from saisa_jax.core import mesh as mesh_lib
from saisa_jax.core.state import abstract_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "chat_template.json")
# Namespace of a separate CLIP tower directory in the released SAISA layout.
TOWER_NS = "model.vision_tower.vision_tower."


# ------------------------------------------------------------------------ tensor sources

def open_source(path: str):
  """A safetensors directory or a GGUF file / directory -> reader."""
  gguf = find_gguf(path)
  return GGUFSource(gguf) if gguf else SafetensorsDir(path)


class Tensors:
  """Tensors of several sources by canonical name (layout.canonical_name), each
  source under a namespace (e.g. a separate tower directory under TOWER_NS)."""

  def __init__(self, sources: list[tuple[str, str]]):
    self.sources = [(os.path.abspath(p), ns) for p, ns in sources]
    self.index = {}
    for path, ns in self.sources:
      reader = open_source(path)
      for key in reader.keys():
        self.index.setdefault(ns + layout.canonical_name(key), (reader, key))

  def has(self, name: str) -> bool:
    return layout.canonical_name(name) in self.index

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    """The tensor, or only rows[start:stop] of its first axis."""
    canon = layout.canonical_name(name)
    if canon not in self.index:
      raise KeyError(f"{name} is in none of {[p for p, _ in self.sources]}")
    reader, key = self.index[canon]
    return reader.read(key, rows)

  def shape(self, name: str) -> tuple[int, ...]:
    reader, key = self.index[layout.canonical_name(name)]
    return reader.shape(key)


# ---------------------------------------------------------------------------- configs

def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def llm_config_from_hf(c: dict) -> dict:
  """A LlamaConfig-like dict (LLaMA, Vicuna, LLaMA-3, Mistral, SmolLM2) -> model.llm."""
  if c.get("model_type") not in (None, "llama", "mistral", "llava_llama"):
    logging.warning("model_type %r: importing it as a LLaMA-family decoder", c.get("model_type"))
  if c.get("sliding_window") and c.get("use_sliding_window", True) is not False:
    logging.warning("sliding_window=%s is ignored (full attention)", c["sliding_window"])
  if c.get("attention_bias") or c.get("mlp_bias"):
    raise ValueError("attention / MLP biases are not part of our LLaMA decoder")
  rope = dict(c.get("rope_parameters") or {})
  theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
  scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  if scaling:
    scaling = {k: scaling[k] for k in ("rope_type", "factor", "low_freq_factor",
                                       "high_freq_factor", "original_max_position_embeddings")
               if k in scaling}
    scaling.setdefault("rope_type", (c.get("rope_scaling") or {}).get("type"))
  heads = int(c["num_attention_heads"])
  out = dict(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
             intermediate_size=int(c["intermediate_size"]),
             num_layers=int(c["num_hidden_layers"]), num_heads=heads,
             num_kv_heads=int(c.get("num_key_value_heads") or heads),
             rms_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
             rope_scaling=scaling or None,
             tie_embeddings=bool(c.get("tie_word_embeddings", False)))
  if c.get("head_dim") and int(c["head_dim"]) != out["hidden_size"] // heads:
    out["head_dim"] = int(c["head_dim"])
  return out


def vision_config_from_hf(c: dict, select_layer: int) -> dict:
  """CLIPVisionConfig (or a CLIPConfig holding one) -> model.vision."""
  if c.get("model_type") == "clip" or "text_config" in c:
    c = c["vision_config"]
  if c.get("hidden_act", "quick_gelu") != "quick_gelu":
    raise ValueError(f"CLIP hidden_act {c['hidden_act']!r}; our tower uses quick_gelu")
  return dict(image_size=int(c["image_size"]), patch_size=int(c["patch_size"]),
              hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
              num_layers=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
              layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)), select_layer=int(select_layer))


def detect(path: str) -> str:
  """'gguf' | 'saisa' (released SAISA or LLaVA-1.5) | 'hf_llava' | 'llm' | 'tower'."""
  if find_gguf(path):
    return "gguf"
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json (and no .gguf)")
  mt = read_json(cfg_path).get("model_type")
  if mt == "llava":
    return "hf_llava"
  if mt == "llava_llama" or any(k.startswith("mm_") for k in read_json(cfg_path)):
    return "saisa"
  if mt in ("clip", "clip_vision_model"):
    return "tower"
  return "llm"


def resolve_tower_dir(name: str | None, base: str | None) -> str | None:
  if not name:
    return None
  # A relative name is the export's own folder first (our exports write "vision_tower").
  for cand in (([os.path.join(base, name)] if base and not os.path.isabs(name) else []) + [name]):
    if os.path.isdir(cand) and os.path.exists(os.path.join(cand, "config.json")):
      return os.path.abspath(cand)
  return None


# ------------------------------------------------------------------------ streamed load

def _fill_stacked(tensors: Tensors, rule, names, shape, sharding):
  """A stacked leaf, built one layer at a time in a donated device buffer."""
  per = layer_sharding(sharding)
  buf = jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)()
  put = jax.jit(lambda b, x, l: jax.lax.dynamic_update_index_in_dim(b, x, l, 0),
                donate_argnums=0, out_shardings=sharding)
  for l, name in enumerate(names):
    def one(index, name=name):
      return _ours(rule, tensors.read(name), shape[1:])[index]
    x = jax.make_array_from_callback(shape[1:], per, one)
    buf = put(buf, x, l)
    del x
  return buf


def _ours(rule, tensor, shape):
  return np.ascontiguousarray(layout.to_ours(rule, tensor, shape), np.float32)


CHUNK_BYTES = 64 << 20


def _fill_rows(tensors: Tensors, rule, name, shape, sharding):
  """A large 2-D unstacked leaf (embedding, lm_head), read CHUNK_BYTES of torch rows
  at a time into a donated device buffer. Torch rows are our rows for a copy and
  our columns for a linear ([out, in] -> [in, out])."""
  axis = 0 if rule.kind == "copy" else 1
  n_rows = shape[axis]
  step = min(n_rows, max(1, CHUNK_BYTES // (4 * shape[1 - axis])))
  replicated = NamedSharding(sharding.mesh, PartitionSpec())
  buf = jax.jit(lambda: jnp.zeros(shape, jnp.float32), out_shardings=sharding)()
  put = jax.jit(lambda b, x, i: jax.lax.dynamic_update_slice_in_dim(b, x, i, axis),
                donate_argnums=0, out_shardings=sharding)
  for start in range(0, n_rows, step):
    start = min(start, n_rows - step)  # the last window overlaps: one shape, one compile
    rows = tensors.read(name, slice(start, start + step))
    chunk = np.ascontiguousarray(rows if axis == 0 else rows.T, np.float32)
    buf = put(buf, jax.device_put(chunk, replicated), start)
    del rows, chunk
  return buf


def layer_sharding(sharding: NamedSharding) -> NamedSharding:
  """The sharding of one layer of a stacked leaf (the layer axis dropped)."""
  return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


def load_leaf(tensors: Tensors, rule, cfg: ModelConfig, shape, sharding):
  names = [n for _, n in layout.expand(rule, layout.layer_count(cfg, rule))]
  if layout.is_stacked(rule):
    return _fill_stacked(tensors, rule, names, tuple(shape), sharding)
  if (len(shape) == 2 and rule.kind in ("copy", "linear") and tensors.shape(names[0]) ==
      layout.theirs_shape(rule, tuple(shape)) and 4 * np.prod(shape) > 2 * CHUNK_BYTES):
    return _fill_rows(tensors, rule, names[0], tuple(shape), sharding)
  return jax.make_array_from_callback(
      tuple(shape), sharding, lambda index: _ours(rule, tensors.read(names[0]), shape)[index])


def fresh_projectors(cfg: ModelConfig, shardings, key):
  """New projector params (as model.init makes them), placed on their shardings."""
  c, d = cfg.vision.hidden_size, cfg.llm.hidden_size
  proj = MLPProjector(d)
  init_one = lambda k: nn.meta.unbox(proj.init(k, jnp.zeros((1, c), jnp.float32))["params"])
  if cfg.alignment == "saisa":
    fn = lambda k: jax.vmap(init_one)(jax.random.split(k, cfg.llm.num_layers))
    sh = shardings["decoder"]["layers"]["projector"]
  else:
    fn, sh = init_one, shardings["projector"]
  return jax.jit(fn, out_shardings=sh)(key)


def fresh_tower(cfg: ModelConfig, shardings, key):
  s = cfg.vision.image_size
  tower = VisionTower(cfg.vision)
  fn = lambda k: nn.meta.unbox(tower.init(k, jnp.zeros((1, s, s, 3), jnp.float32))["params"])
  return jax.jit(fn, out_shardings=shardings["vision"])(key)


def load_params(tensors: Tensors, cfg: ModelConfig, rules, mesh, mesh_rules=mesh_lib.DEFAULT_RULES,
                fresh: tuple[str, ...] = (), seed: int = 0):
  """Streams every leaf of `rules` from `tensors` onto the mesh.

  fresh: subtrees to initialise instead ('projector', 'vision') when the source does
  not hold them. Returns (params, list of freshly initialised subtrees)."""
  model, _ = build(cfg)
  boxed = abstract_params(model, cfg)
  shapes = nn.meta.unbox(boxed)
  shardings = mesh_lib.logical_shardings(boxed, mesh, mesh_rules)
  params: dict = {}
  made = []
  for part in fresh:
    part_rules = [r for r in rules if _part(r) == part]
    if all(tensors.has(n) for r in part_rules
           for _, n in layout.expand(r, layout.layer_count(cfg, r))):
      continue  # the source has them: load
    key = jax.random.fold_in(jax.random.key(seed), len(made))
    if part == "projector":
      value = fresh_projectors(cfg, shardings, key)
      path = ("decoder", "layers", "projector") if cfg.alignment == "saisa" else ("projector",)
    else:
      value, path = fresh_tower(cfg, shardings, key), ("vision",)
    layout._assign(params, path, value)
    made.append(part)
  missing = []
  progress = Progress("importing tensors", sum(
      4 * int(np.prod(layout._lookup(shapes, r.ours).shape)) for r in rules
      if _part(r) not in made), unit="GB (float32)")
  for rule in rules:
    if _part(rule) in made:
      continue
    names = [n for _, n in layout.expand(rule, layout.layer_count(cfg, rule))]
    absent = [n for n in names if not tensors.has(n)]
    if absent:
      missing += absent
      continue
    leaf_shape = layout._lookup(shapes, rule.ours).shape
    got = tensors.shape(names[0])
    want = layout.theirs_shape(rule, layout.layer_shape(rule, leaf_shape))
    if int(np.prod(got)) != int(np.prod(want)):
      raise ValueError(f"{names[0]}: shape {got} in the checkpoint, the config implies {want}")
    layout._assign(params, rule.ours, load_leaf(tensors, rule, cfg, leaf_shape,
                                               layout._lookup(shardings, rule.ours)))
    progress.advance(4 * int(np.prod(leaf_shape)))
  if missing:
    raise KeyError(f"{len(missing)} tensors missing from {[p for p, _ in tensors.sources]}, "
                   f"e.g. {missing[:4]} (wrong layout, or pass --vision-tower / --alignment)")
  return params, made


def _part(rule) -> str:
  if rule.ours[0] == "vision":
    return "vision"
  return "projector" if "projector" in rule.ours else "llm"


# ------------------------------------------------------------------------ import plans

class Plan:
  """What to read from where: sources, rules layout, configs, tokenizer, extras."""

  def __init__(self):
    self.sources: list[tuple[str, str]] = []
    self.layout = "saisa"
    self.llm: dict = {}
    self.vision: dict = {}
    self.alignment = "saisa"
    self.fresh: tuple[str, ...] = ()
    self.tokenizer_dir: str | None = None
    self.gguf: GGUFSource | None = None
    self.tower_dir: str | None = None
    self.kind = ""
    self.fresh_made: list[str] = []
    self.image_token_index: int | None = None
    self.data: dict = {}  # config.json "saisa_data" of our exports: prompt, preprocessing
    self.eas: dict | None = None  # config.json "eas" of an EAS export: the skipped layers


def plan_import(args) -> Plan:
  p = Plan()
  select = args.select_layer
  if args.checkpoint:
    src = os.path.abspath(args.checkpoint)
    kind = detect(src)
    if kind not in ("saisa", "hf_llava"):
      raise ValueError(f"{src} looks like {kind!r}, not a full SAISA / LLaVA checkpoint "
                       "(use --llm for a language model)")
    p.kind, raw = kind, read_json(os.path.join(src, "config.json"))
    p.data = dict(raw.get("saisa_data") or {})
    p.eas = dict(raw["eas"]) if raw.get("eas") else None
    p.sources.append((src, ""))
    p.tokenizer_dir = src
    if kind == "hf_llava":
      p.layout, p.alignment = "hf_llava", args.alignment or "llava"
      p.image_token_index = raw.get("image_token_index", raw.get("image_token_id"))
      p.llm = llm_config_from_hf(raw["text_config"])
      if raw.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("only vision_feature_select_strategy 'default' (CLS dropped)")
      layer = raw.get("vision_feature_layer", -2)
      p.vision = vision_config_from_hf(raw["vision_config"], layer if select is None else select)
    else:
      names = SafetensorsDir(src).keys()
      has_layer_proj = any(".mm_projector." in k and k.startswith("model.layers.") for k in names)
      p.alignment = args.alignment or ("saisa" if has_layer_proj else "llava")
      p.llm = llm_config_from_hf(raw)
      if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError("only mm_vision_select_feature 'patch' (CLS dropped)")
      if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {raw['mm_projector_type']!r} (only mlp2x_gelu)")
      layer = raw.get("mm_vision_select_layer", -2) if select is None else select
      tower_in_main = any(k.startswith("model.vision_tower.") for k in names)
      tower_dir = resolve_tower_dir(args.vision_tower or raw.get("mm_vision_tower"), src)
      if tower_dir and (args.vision_tower or not tower_in_main):
        p.sources.append((tower_dir, TOWER_NS))
        p.tower_dir = tower_dir
        p.vision = vision_config_from_hf(read_json(os.path.join(tower_dir, "config.json")), layer)
      elif tower_in_main and raw.get("vision_config"):
        p.vision = vision_config_from_hf(raw["vision_config"], layer)
      elif args.vision_preset:
        p.vision = presets.lookup(presets.TOWERS, args.vision_preset, "tower")
        p.fresh += ("vision",)
      else:
        raise FileNotFoundError(
            f"the vision tower of {src} is not in its weights and mm_vision_tower="
            f"{raw.get('mm_vision_tower')!r} is not a local directory: pass --vision-tower DIR")
    p.fresh += ("projector",)  # used only when the source lacks them (another alignment)
    return p

  if not args.llm:
    raise ValueError("give --checkpoint (a full model) or --llm (a language model)")
  src = os.path.abspath(args.llm)
  p.kind = detect(src)
  if p.kind == "gguf":
    p.gguf = GGUFSource(find_gguf(src))
    p.llm = p.gguf.llm_config()
  elif p.kind == "llm":
    p.llm = llm_config_from_hf(read_json(os.path.join(src, "config.json")))
    p.tokenizer_dir = src
  else:
    raise ValueError(f"--llm {src} is a {p.kind!r} checkpoint; use --checkpoint")
  p.sources.append((src, ""))
  p.alignment = args.alignment or "saisa"
  p.fresh = ("projector",)
  if args.vision_tower:
    tower = os.path.abspath(args.vision_tower)
    if detect(tower) != "tower":
      raise ValueError(f"--vision-tower {tower} is not a CLIP (vision) model directory")
    p.sources.append((tower, TOWER_NS))
    p.tower_dir = tower
    p.vision = vision_config_from_hf(read_json(os.path.join(tower, "config.json")),
                                     -2 if select is None else select)
  elif args.vision_preset:
    p.vision = presets.lookup(presets.TOWERS, args.vision_preset, "tower")
    if select is not None:
      p.vision["select_layer"] = select
    p.fresh += ("vision",)
  else:
    raise ValueError("an LM import needs --vision-tower CLIP_DIR or --vision-preset NAME")
  return p


def build_config(p: Plan, args, tokenizer_path: str) -> ml_collections.ConfigDict:
  from saisa_jax.data.config import get_data_config

  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      alignment=p.alignment, dtype=args.dtype, remat="none", scan_unroll=1,
      llm={k: v for k, v in p.llm.items() if k != "rope_scaling"}, vision=dict(p.vision)))
  c.model.llm.rope_scaling = ml_collections.FieldReference(p.llm.get("rope_scaling"),
                                                           field_type=dict)
  if p.eas:  # an EAS export: its skipped layers and the PIA adapters' shapes
    c.model.eas = ml_collections.ConfigDict(dict(p.eas, enabled=True))
  c.template = args.template or p.data.get("template") or guess_template(tokenizer_path)
  c.data = get_data_config()
  c.data.tokenizer = tokenizer_path
  c.data.template = c.template
  # What an export of ours recorded about the prompt and the images (saisa_data).
  if "system_prompt" in p.data:
    c.data.system_prompt = p.data["system_prompt"]
  for key in ("image_aspect", "image_mean", "image_std"):
    if p.data.get(key) is not None:
      c.data[key] = tuple(p.data[key]) if isinstance(p.data[key], list) else p.data[key]
  c.imported = ml_collections.ConfigDict(dict(
      kind=p.kind, layout=p.layout, sources=[list(s) for s in p.sources],
      vision_tower=p.tower_dir or "", fresh=list(p.fresh_made)))
  if p.image_token_index is not None:
    c.imported.image_token_index = int(p.image_token_index)
  return c


def guess_template(tokenizer_path: str) -> str:
  """llama_3 for LLaMA-3's tokenizer, chatml for ChatML ones (SmolLM2, Qwen), else
  vicuna_v1 (LLaVA-1.5)."""
  path = os.path.join(tokenizer_path, "tokenizer.json") if tokenizer_path else ""
  if path and os.path.exists(path):
    with open(path) as f:
      text = f.read(2_000_000)
    if "<|end_of_text|>" in text:
      return "llama_3"
    if "<|im_start|>" in text and "<|im_end|>" in text:
      return "chatml"
  return "vicuna_v1"


def copy_tokenizer(p: Plan, args, out_dir: str) -> str:
  """Tokenizer files -> out_dir/tokenizer; returns that path ('' when none found)."""
  dst = os.path.join(out_dir, "tokenizer")
  src = os.path.abspath(args.tokenizer) if args.tokenizer else p.tokenizer_dir
  if src is None and p.gguf is not None:
    p.gguf.save_tokenizer(dst)
    return dst
  files = [f for f in TOKENIZER_FILES if src and os.path.exists(os.path.join(src, f))]
  if not files:
    logging.warning("no tokenizer files found in %s: set data.tokenizer yourself", src)
    return ""
  os.makedirs(dst, exist_ok=True)
  for f in files:
    shutil.copy(os.path.join(src, f), os.path.join(dst, f))
  return dst


def copy_generation_config(p: Plan, out_dir: str) -> None:
  out = os.path.join(out_dir, "generation_config.json")
  for path, _ in p.sources:
    src = os.path.join(path, "generation_config.json")
    if os.path.isdir(path) and os.path.exists(src):
      shutil.copy(src, out)
      return
  if p.gguf is not None:
    with open(out, "w") as f:
      json.dump(p.gguf.special_ids(), f, indent=2)


def import_checkpoint(args) -> tuple[dict, ml_collections.ConfigDict]:
  """Runs the import (see `main` for the arguments); returns (params, config)."""
  p = plan_import(args)
  cfg = from_config({"alignment": p.alignment, "dtype": args.dtype,
                     "llm": p.llm, "vision": p.vision,
                     "eas": dict(p.eas, enabled=True) if p.eas else None})
  rules = layout.model_rules(cfg, p.layout)
  mesh = mesh_lib.make_mesh(parse_mesh(args.mesh))
  tensors = Tensors(p.sources) if p.gguf is None else _gguf_tensors(p, args)
  params, made = load_params(tensors, cfg, rules, mesh, fresh=p.fresh, seed=args.seed)
  p.fresh_made = made
  for part in made:
    logging.warning("%s: not in the source, freshly initialised (seed %d)", part, args.seed)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  tok = copy_tokenizer(p, args, out)
  config = build_config(p, args, tok)
  copy_generation_config(p, out)
  _check_vocab(cfg, tok)
  ckpt_lib.save_model(out, params, config)
  return params, config


def _gguf_tensors(p: Plan, args) -> Tensors:
  t = Tensors(p.sources[1:])
  for key in p.gguf.keys():
    t.index[layout.canonical_name(key)] = (p.gguf, key)
  t.sources = [(p.gguf.path, "")] + t.sources
  return t


def parse_mesh(text: str) -> dict:
  shape = {"data": 1, "fsdp": -1, "tensor": 1}
  for item in filter(None, (text or "").split(",")):
    k, v = item.split("=")
    shape[k] = int(v)
  return shape


def _check_vocab(cfg: ModelConfig, tokenizer_path: str) -> None:
  if not tokenizer_path:
    return
  try:
    from saisa_jax.data.tokenizer import load_tokenizer
    n = len(load_tokenizer(tokenizer_path))
  except Exception as e:  # a tokenizer we cannot load is reported, not fatal
    logging.warning("could not load the tokenizer at %s: %s", tokenizer_path, e)
    return
  if n > cfg.llm.vocab_size:
    logging.warning("the tokenizer has %d tokens, the model's vocab_size is %d", n,
                    cfg.llm.vocab_size)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="saisa-import", description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="model directory to write")
  ap.add_argument("--checkpoint", help="released SAISA / LLaVA-1.5 / HF Llava directory")
  ap.add_argument("--llm", help="LLaMA-family LM: HF safetensors directory or .gguf")
  ap.add_argument("--vision-tower", help="CLIP vision tower directory (CLIPVisionModel / CLIPModel)")
  ap.add_argument("--vision-preset", help="fresh tower from saisa_jax/presets.py TOWERS (e.g. tiny)")
  ap.add_argument("--alignment", choices=("saisa", "llava", "naavit"))
  ap.add_argument("--select-layer", type=int, default=None,
                  help="tower hidden state the features come from (default: the checkpoint's, or -2)")
  ap.add_argument("--template", choices=("vicuna_v1", "llama_3", "chatml", "plain"))
  ap.add_argument("--tokenizer", help="take the tokenizer files from this directory")
  ap.add_argument("--dtype", default="float32", help="model.dtype (compute); params stay float32")
  ap.add_argument("--mesh", default="fsdp=-1", help="mesh axes, e.g. fsdp=-1,tensor=1")
  ap.add_argument("--seed", type=int, default=0, help="seed of freshly initialised parts")
  return ap


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  args = parser().parse_args(argv)
  _, config = import_checkpoint(args)
  print(f"saisa-import: wrote {os.path.abspath(args.out)} (alignment {config.model.alignment}, "
        f"{config.model.llm.num_layers} layers, template {config.template}, "
        f"tokenizer {config.data.tokenizer or 'none'})")


if __name__ == "__main__":
  main()
