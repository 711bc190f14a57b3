"""saisa-export: a saisa-jax model directory (or training workdir) -> PyTorch layouts.

  saisa-export --model DIR --out OUT_saisa                 (released SAISA layout)
  saisa-export --model DIR --out OUT_hf --layout hf_llava  (llava mode only)

Released SAISA layout (model_type llava_llama, what the release's loader and
saisa_jax.convert.torch_saisa read): config.json (the LlamaConfig + the mm_* keys +
the tower's vision_config), model*.safetensors (+ index when sharded), tokenizer
files, generation_config.json. The tower:
  * its weights are written into the main safetensors under
    model.vision_tower.vision_tower.vision_model.* (as the release saves them);
  * mm_vision_tower names a CLIPVisionModel directory, because the release's loader
    only reads the tower from there: the tower the model was imported with when that
    directory still exists, else OUT/vision_tower, written here (--tower-dir).
  Our params hold only the layers that produce hidden_states[select_layer]; the rest
  of a loadable CLIPVisionModel (the layers after it, post_layernorm) is copied from
  the checkpoint the model was imported from (config.json `imported.sources`) when it
  is readable, else written as identity layers (zero projections, unit norms), which
  leave the features SAISA/LLaVA read unchanged (a warning says so).
  The global model.mm_projector (unused by SAISA) is copied from the source, else
  written as a copy of layer 0's projector, so loaders report no missing keys.
HF Llava layout (LlavaForConditionalGeneration, transformers' own on-disk names):
  the vocabulary grows by one <image> token (embedding / lm_head rows = the mean row)
  unless the tokenizer already has one, and preprocessor_config.json is written.

Streaming: every tensor is produced from the restored params when the writer needs
it (one layer at a time) and written straight to its file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil

import jax
import numpy as np

from saisa_jax.core import paths
from saisa_jax.convert import layout
from saisa_jax.convert.safetensors_io import Entry, write_sharded
from saisa_jax.models.build import build
from saisa_jax.models.config import ModelConfig, from_config
from saisa_jax.core import checkpoint as ckpt_lib
from saisa_jax.core.state import abstract_params
from saisa_jax.data.config import CLIP_MEAN, CLIP_STD

SAISA_TOWER = "model.vision_tower.vision_tower.vision_model."
IMAGE_TOKEN = "<image>"
RELEASE_TOWER_WIDTH = 1024  # the release's LlavaLlamaModel: nn.Linear(1024, ...) per layer
_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


# ----------------------------------------------------------------------------- inputs

def restore(model_dir: str):
  """-> (params as host numpy arrays, config, ModelConfig, resolved dir)."""
  import flax.linen as nn

  model_dir = ckpt_lib.resolve_model_dir(model_dir)
  config = ckpt_lib.load_config(model_dir)
  model, cfg = build(config.model)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          nn.meta.unbox(abstract_params(model, cfg)))
  return restore_params(model_dir, abstract), config, cfg, model_dir


def restore_params(model_dir: str, abstract):
  """checkpoint.load_params's files, restored as numpy arrays with a cap on the bytes
  orbax reads at once. The writers only read the params: a jax array would be
  placed from a numpy buffer orbax reads first (a leaf held twice), and orbax's
  default cap reads everything into temporary buffers first (the model twice)."""
  import orbax.checkpoint as ocp

  ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=1))
  args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype),
                      abstract)
  return ckpt.restore(os.path.join(model_dir, "params"),
                      ocp.args.PyTreeRestore(abstract, restore_args=args))


def source_tensors(config):
  """The checkpoint(s) the model was imported from, if still readable (else None)."""
  from saisa_jax.convert.hf_import import Tensors

  sources = [tuple(s) for s in (config.get("imported", {}) or {}).get("sources", []) or []]
  sources = [s for s in sources if os.path.exists(s[0])]
  if not sources:
    return None
  try:
    return Tensors(sources)
  except Exception as e:  # noqa: BLE001 - a vanished or changed source is not fatal
    logging.warning("import sources %s unreadable (%s); not using them", sources, e)
    return None


def _layer(params, rule, l):
  leaf = layout._lookup(params, rule.ours)
  return np.asarray(leaf if l is None else leaf[l], np.float32)


def param_entries(params, cfg: ModelConfig, rules, dtype: str, rename=lambda n: n) -> list[Entry]:
  """One Entry per torch tensor of `rules`, produced on demand from our params."""
  shapes = jax.tree.map(lambda a: a.shape, params)
  out = []
  for rule in rules:
    ours = layout.layer_shape(rule, layout._lookup(shapes, rule.ours))
    shape = layout.theirs_shape(rule, ours)
    for l, name in layout.expand(rule, layout.layer_count(cfg, rule)):
      out.append(Entry(rename(name), shape,
                       lambda rule=rule, l=l, s=shape: layout.to_theirs(
                           rule, _layer(params, rule, l)).reshape(s), dtype))
  return out


def tower_tail_entries(cfg: ModelConfig, prefix: str, source, dtype: str) -> list[Entry]:
  """The CLIPVisionModel tensors our params lack (see the module docstring)."""
  out, filled = [], []
  for name in layout.clip_tail_names(cfg, prefix):
    shape = layout.clip_tail_shape(cfg, name)
    # Source names may be in any layout: try the tower under our saisa prefix too.
    cands = [name, SAISA_TOWER + name[len(prefix):]]
    found = next((c for c in cands if source is not None and source.has(c)), None)
    if found is not None:
      out.append(Entry(name, shape, lambda c=found: source.read(c), dtype))
    else:
      unit = "layer_norm" in name or "post_layernorm" in name
      fill = 1.0 if unit and name.endswith("weight") else 0.0
      out.append(Entry(name, shape, lambda s=shape, v=fill: np.full(s, v, np.float32), dtype))
      filled.append(name)
  if filled:
    logging.warning("%d tower tensors (layers after select_layer=%d, post_layernorm) are not "
                    "in the params and no source holds them: written as identity; the "
                    "features at select_layer are exact", len(filled), cfg.vision.select_layer)
  return out


# ----------------------------------------------------------------------------- configs

def llama_config(cfg: ModelConfig, vocab_size: int, special: dict, max_pos: int):
  import transformers

  c = cfg.llm
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling:
    _, factor, low, high, orig = c.rope_scaling
    rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig}
  return transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.dim_per_head, rms_norm_eps=c.rms_eps,
      rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
      max_position_embeddings=max_pos, **special)


def clip_config(cfg: ModelConfig):
  import transformers

  v = cfg.vision
  return transformers.CLIPVisionConfig(
      image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
      intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
      num_attention_heads=v.num_heads, layer_norm_eps=v.layer_norm_eps,
      hidden_act="quick_gelu")


def _plain(d: dict) -> dict:
  d = dict(d)
  d.pop("transformers_version", None)
  return d


def tokenizer_dir(config) -> str | None:
  path = (config.get("data", {}) or {}).get("tokenizer", "")
  return path if path and os.path.isdir(path) else None


def special_ids(config) -> dict:
  """bos / eos / pad ids from the tokenizer, if one is there."""
  tok_dir = tokenizer_dir(config)
  if tok_dir is None:
    return {}
  try:
    from saisa_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
  except Exception as e:  # noqa: BLE001
    logging.warning("tokenizer at %s not loadable (%s): no special ids in config.json", tok_dir, e)
    return {}
  out = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
         "pad_token_id": tok.pad_token_id}
  return {k: v for k, v in out.items() if v is not None}


def max_positions(config) -> int:
  src = ((config.get("imported", {}) or {}).get("sources") or [[""]])[0][0]
  path = os.path.join(src, "config.json") if src and os.path.isdir(src) else ""
  if path and os.path.exists(path):
    with open(path) as f:
      raw = json.load(f)
    raw = raw.get("text_config", raw)
    if raw.get("max_position_embeddings"):
      return int(raw["max_position_embeddings"])
  return 4096


def copy_tokenizer_files(config, out_dir: str) -> None:
  src = tokenizer_dir(config)
  if src is None:
    logging.warning("no tokenizer directory in the model's config (data.tokenizer): "
                    "the export has no tokenizer files")
    return
  for f in os.listdir(src):
    if os.path.isfile(os.path.join(src, f)):
      shutil.copy(os.path.join(src, f), os.path.join(out_dir, f))


# transformers 5 writes its own class names and list-valued fields into
# tokenizer_config.json; a transformers-4 loader (the SAISA release: 4.37) knows neither.
_V5_ONLY_KEYS = ("backend", "is_local", "local_files_only")


def portable_tokenizer_config(config, out_dir: str, added: dict | None = None) -> None:
  """Rewrites OUT/tokenizer_config.json so that transformers 4.x and 5.x both load it:
  a class both know (LlamaTokenizer for a SentencePiece model, else
  PreTrainedTokenizerFast over tokenizer.json), additional_special_tokens as a list,
  the chat template of the model's prompt (data/model_prompt.py). `added`: {id: token}
  added here (the <image> token), written as added_tokens_decoder for slow tokenizers."""
  from saisa_jax.data.model_prompt import chat_template_jinja
  from saisa_jax.data.tokenizer import load_tokenizer

  path = os.path.join(out_dir, "tokenizer_config.json")
  d = json.load(open(path)) if os.path.exists(path) else {}
  tok = load_tokenizer(out_dir)
  sp = os.path.exists(os.path.join(out_dir, "tokenizer.model"))
  fast = os.path.exists(os.path.join(out_dir, "tokenizer.json"))
  cls = d.get("tokenizer_class")
  if cls in (None, "TokenizersBackend", "SentencePieceBackend") or (cls.endswith("Fast") and not fast):
    d["tokenizer_class"] = "LlamaTokenizer" if sp else "PreTrainedTokenizerFast"
  for k in _V5_ONLY_KEYS:
    d.pop(k, None)
  extra = d.pop("extra_special_tokens", None)
  if isinstance(extra, list):
    d["additional_special_tokens"] = sorted(set(d.get("additional_special_tokens", []) + extra))
  elif isinstance(extra, dict) and extra:
    d["extra_special_tokens"] = extra
  for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
    v = getattr(tok, k, None)
    if v is not None and k not in d:
      d[k] = str(v)
  if sp:
    d.setdefault("add_bos_token", True)
    d.setdefault("legacy", bool(getattr(tok, "legacy", True)))
  if added:
    dec = d.setdefault("added_tokens_decoder", {})
    for i, t in added.items():
      dec[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
  d["chat_template"] = chat_template_jinja(config, tok)
  with open(path, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
    f.write(d["chat_template"])


def data_record(config) -> dict:
  """How the model reads its inputs (config.json "saisa_data"): saisa-import reads it
  back, so the prompt and preprocessing survive export -> import."""
  from saisa_jax.data.model_prompt import system_prompt, template_name

  d = config.get("data", {}) or {}
  return {"template": template_name(config), "system_prompt": system_prompt(config),
          "image_aspect": d.get("image_aspect", "pad"),
          "image_mean": list(d.get("image_mean", CLIP_MEAN)),
          "image_std": list(d.get("image_std", CLIP_STD))}


def image_processor_config(config, cfg: ModelConfig, llava: bool = False) -> dict:
  """preprocessor_config.json: CLIP's resize + centre crop, with the model's mean / std
  (CLIPImageProcessor, the class a transformers-4 tower folder needs). `llava`: the
  LlavaImageProcessor of HF Llava, which pads to a square with the mean colour first
  when the model was trained with image_aspect 'pad', as LLaVA-1.5 does."""
  r = data_record(config)
  s = cfg.vision.image_size
  out = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
         "size": {"shortest_edge": s}, "do_center_crop": True,
         "crop_size": {"height": s, "width": s}, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": r["image_mean"],
         "image_std": r["image_std"], "do_convert_rgb": True, "resample": 3}
  if llava:
    out.update(image_processor_type="LlavaImageProcessor", do_pad=r["image_aspect"] == "pad",
               processor_class="LlavaProcessor")
  return out


def write_generation_config(model_dir: str, config, out_dir: str, special: dict) -> None:
  src = paths.join(model_dir, "generation_config.json")
  if paths.exists(src):
    paths.write_text(os.path.join(out_dir, "generation_config.json"), paths.read_text(src))
    return
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({**special, "do_sample": False}, f, indent=2)


def write_tower_dir(params, cfg: ModelConfig, source, out_dir: str, dtype: str) -> str:
  """A standalone CLIPVisionModel directory (hub spelling vision_model.*)."""
  path = os.path.join(out_dir, "vision_tower")
  rules = [r for r in layout.clip_rules(SAISA_TOWER)]
  rename = lambda n: "vision_model." + n[len(SAISA_TOWER):]
  entries = (param_entries(params, cfg, rules, dtype, rename)
             + tower_tail_entries(cfg, "vision_model.", source, dtype))
  write_sharded(path, entries)
  conf = _plain(clip_config(cfg).to_dict())
  conf["architectures"] = ["CLIPVisionModel"]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(conf, f, indent=2)
  return path


def write_tower_preprocessor(config, cfg: ModelConfig, path: str) -> None:
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump(image_processor_config(config, cfg), f, indent=2)


# ----------------------------------------------------------------------------- layouts

def export_saisa(params, config, cfg: ModelConfig, model_dir: str, out: str, dtype: str = "float32",
                 max_shard_bytes: int = 4 << 30, tower_dir: str = "always",
                 dest: str | None = None) -> None:
  """`dest`: where `out` is uploaded to, when `out` is a staging folder."""
  st = _DTYPES[dtype]
  source = source_tensors(config)
  entries = param_entries(params, cfg, layout.model_rules(cfg, "saisa"), st)
  entries += tower_tail_entries(cfg, SAISA_TOWER, source, st)
  if cfg.alignment == "saisa":  # the global LLaVA projector, unused by SAISA
    d = cfg.llm.hidden_size
    shapes = {"0.weight": (d, cfg.vision.hidden_size), "0.bias": (d,), "2.weight": (d, d),
              "2.bias": (d,)}
    rules = {r.theirs.split("mm_projector.")[1]: r for r in layout.saisa_projector_rules()}
    for part, shape in shapes.items():
      name = "model.mm_projector." + part
      if source is not None and source.has(name):
        entries.append(Entry(name, shape, lambda n=name: source.read(n), st))
      else:
        entries.append(Entry(name, shape, lambda r=rules[part]: layout.to_theirs(
            r, _layer(params, r, 0)), st))
  os.makedirs(out, exist_ok=True)
  write_sharded(out, entries, max_shard_bytes)

  imported = (config.get("imported", {}) or {}).get("vision_tower", "")
  if tower_dir == "never":
    mm_tower = imported or None
  elif tower_dir == "auto" and imported and os.path.isdir(imported):
    mm_tower = imported
  else:  # in the export, named relative to it: the folder travels whole
    write_tower_preprocessor(config, cfg, write_tower_dir(params, cfg, source, out, st))
    mm_tower = "vision_tower"
  if cfg.vision.hidden_size != RELEASE_TOWER_WIDTH:
    logging.warning(
        "the tower is %d wide: the SAISA release's per-layer projector takes %d-wide "
        "features (CLIP-L), so the authors' loader cannot load this export; "
        "saisa_jax.convert.torch_saisa (and saisa-import) can", cfg.vision.hidden_size,
        RELEASE_TOWER_WIDTH)
  special = special_ids(config)
  record = data_record(config)
  d = _plain(llama_config(cfg, cfg.llm.vocab_size, special, max_positions(config)).to_dict())
  d.pop("dtype", None)
  rp = d.get("rope_parameters") or {}
  extra = {k: v for k, v in rp.items() if k != "rope_theta"}
  d.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
           rope_theta=rp.get("rope_theta"),
           rope_scaling=None if extra.get("rope_type", "default") == "default" else extra,
           torch_dtype=dtype, mm_vision_tower=mm_tower, mm_hidden_size=cfg.vision.hidden_size,
           mm_vision_select_layer=cfg.vision.select_layer, mm_vision_select_feature="patch",
           mm_projector_type="mlp2x_gelu",
           mm_use_im_start_end=False, mm_use_im_patch_token=False,
           tokenizer_padding_side="right", saisa_alignment=cfg.alignment, vision_config=_plain(clip_config(cfg).to_dict()),
           saisa_data=record, image_aspect_ratio="pad" if record["image_aspect"] == "pad" else "square")
  if cfg.eas is not None:  # the package's PyTorch model (convert/torch_saisa.py) reads it
    e = cfg.eas
    d["eas"] = {"skip": list(e.skip), "width": e.width, "groups": e.groups,
                "temperature": e.temperature, "scale": e.scale,
                "kept_adapters": e.kept_adapters, "kept_width": e.kept_width}
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
  copy_tokenizer_files(config, out)
  if tokenizer_dir(config) is not None:
    portable_tokenizer_config(config, out)
  write_generation_config(model_dir, config, out, special)


def hf_llava_disk_name(name: str) -> str:
  """Our hf_llava rule names -> the names transformers' save_pretrained writes."""
  for new, old in (("model.language_model.", "language_model.model."),
                   ("model.vision_tower.", "vision_tower."),
                   ("model.multi_modal_projector.", "multi_modal_projector.")):
    if name.startswith(new):
      return old + name[len(new):]
  return "language_model.lm_head.weight" if name == "lm_head.weight" else name


def _image_token(config, vocab: int):
  """-> (image token id, tokenizer with it added or None, exported vocab size).

  One id everywhere: the tokenizer's <image>, config.json's image_token_index and the
  processor's. A tokenizer without one gets it appended (id = its length), and the
  export's vocabulary ends there: the embedding's padded rows beyond the tokenizer
  (which no text can name) are dropped, so HF generate cannot emit them either."""
  tok_dir = tokenizer_dir(config)
  tok = None
  if tok_dir is not None:
    try:
      from saisa_jax.data.tokenizer import load_tokenizer
      tok = load_tokenizer(tok_dir)
    except Exception as e:  # noqa: BLE001
      logging.warning("tokenizer at %s not loadable (%s)", tok_dir, e)
  recorded = (config.get("imported", {}) or {}).get("image_token_index")
  if recorded is not None and recorded < vocab:  # the id the source model used
    return int(recorded), None, vocab
  if tok is None:
    return vocab, None, vocab + 1
  have = tok.convert_tokens_to_ids(IMAGE_TOKEN)
  if have is not None and have != tok.unk_token_id and have < vocab:
    return have, tok, vocab
  import copy
  tok = copy.deepcopy(tok)
  n = len(tok)
  if n > vocab:
    logging.warning("the tokenizer has %d tokens, the model %d rows: <image> gets id %d",
                    n, vocab, n)
  tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
  image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
  return image_id, tok, image_id + 1


def export_hf_llava(params, config, cfg: ModelConfig, model_dir: str, out: str,
                    dtype: str = "float32", max_shard_bytes: int = 4 << 30) -> None:
  import transformers

  if cfg.alignment not in ("llava", "naavit"):
    raise ValueError(f"alignment {cfg.alignment!r}: only llava-mode models have a "
                     "LlavaForConditionalGeneration equivalent (use --layout saisa)")
  if cfg.eas is not None and cfg.eas.skip:
    raise ValueError("an EAS model (model.eas.skip) has no LlavaForConditionalGeneration "
                     "equivalent: use --layout saisa")
  if cfg.alignment == "naavit":
    logging.warning("naavit exports as plain LLaVA: HF Llava lets visual tokens attend "
                    "to each other, so its outputs will differ")
  st = _DTYPES[dtype]
  source = source_tensors(config)
  vocab = cfg.llm.vocab_size
  image_id, tok, new_vocab = _image_token(config, vocab)
  entries = param_entries(params, cfg, layout.model_rules(cfg, "hf_llava"), st, hf_llava_disk_name)
  if new_vocab != vocab:  # our rows up to the image id, then the mean row (<image>)
    keep = min(image_id, vocab)
    def resize(name):
      rule = next(r for r in layout.model_rules(cfg, "hf_llava") if r.theirs == name)
      def produce():
        w = layout.to_theirs(rule, _layer(params, rule, None))[:keep]
        return np.concatenate([w, np.repeat(w.mean(0, keepdims=True), new_vocab - keep, 0)])
      return produce
    for e in entries:
      if e.name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        theirs = ("model.language_model.embed_tokens.weight" if "embed" in e.name
                  else "lm_head.weight")
        e.shape, e.produce = (new_vocab, e.shape[1]), resize(theirs)
  entries += tower_tail_entries(cfg, "vision_tower.", source, st)
  os.makedirs(out, exist_ok=True)
  write_sharded(out, entries, max_shard_bytes)

  special = special_ids(config)
  text = llama_config(cfg, new_vocab, special, max_positions(config))
  conf = transformers.LlavaConfig(
      text_config=text, vision_config=clip_config(cfg), image_token_index=image_id,
      vision_feature_layer=cfg.vision.select_layer, vision_feature_select_strategy="default",
      projector_hidden_act="gelu", image_seq_length=cfg.num_visual,
      tie_word_embeddings=cfg.llm.tie_embeddings)
  d = _plain(conf.to_dict())
  d["architectures"] = ["LlavaForConditionalGeneration"]
  d["dtype"] = dtype
  d["saisa_data"] = data_record(config)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
  copy_tokenizer_files(config, out)
  if tok is not None:
    tok.save_pretrained(out)
  if tokenizer_dir(config) is not None:
    portable_tokenizer_config(config, out, {image_id: IMAGE_TOKEN} if tok is not None else None)
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump(image_processor_config(config, cfg, llava=True), f, indent=2)
  with open(os.path.join(out, "processor_config.json"), "w") as f:
    json.dump({"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
               "patch_size": cfg.vision.patch_size, "num_additional_image_tokens": 1,
               "vision_feature_select_strategy": "default"}, f, indent=2)
  write_generation_config(model_dir, config, out, special)
  _hf_generation_stops(config, out, image_id)


def _hf_generation_stops(config, out: str, image_id: int) -> None:
  """generation_config.json: stop where saisa-chat stops (the tokenizer's EOS and the
  template's end of turn), and never emit <image> (saisa-chat draws only real tokens)."""
  path = os.path.join(out, "generation_config.json")
  g = json.load(open(path))
  if tokenizer_dir(config) is not None:
    from saisa_jax.data.model_prompt import stop_ids
    from saisa_jax.data.tokenizer import load_tokenizer
    stops = stop_ids(config, load_tokenizer(tokenizer_dir(config)))
    g["eos_token_id"] = stops[0] if len(stops) == 1 else stops
  g["suppress_tokens"] = sorted(set(g.get("suppress_tokens") or []) | {int(image_id)})
  with open(path, "w") as f:
    json.dump(g, f, indent=2)


def export_model(model: str, out: str, layout_name: str = "saisa", dtype: str = "float32",
                 max_shard_bytes: int = 4 << 30, tower_dir: str = "always") -> None:
  if layout_name not in ("saisa", "hf_llava"):
    raise ValueError(f"--layout {layout_name!r} (saisa | hf_llava)")
  params, config, cfg, model_dir = restore(model)
  # A bucket destination: written locally, uploaded when complete.
  with paths.staged_dir(paths.absolute(out)) as local:
    if layout_name == "saisa":
      export_saisa(params, config, cfg, model_dir, local, dtype, max_shard_bytes, tower_dir,
                   dest=paths.absolute(out))
    else:
      export_hf_llava(params, config, cfg, model_dir, local, dtype, max_shard_bytes)


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="saisa-export", description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True, help="model directory or training workdir")
  ap.add_argument("--out", required=True, help="directory to write (name it *saisa* for "
                  "the release's loader to pick the SAISA class)")
  ap.add_argument("--layout", default="saisa", choices=("saisa", "hf_llava"))
  ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
  ap.add_argument("--max-shard-gb", type=float, default=4.0)
  ap.add_argument("--tower-dir", default="always", choices=("auto", "always", "never"),
                  help="mm_vision_tower: always = write OUT/vision_tower (named relative to "
                  "OUT: the export is self-contained); auto = the imported tower dir if it "
                  "still exists, else write it; never = keep the recorded name")
  return ap


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  a = parser().parse_args(argv)
  export_model(a.model, a.out, a.layout, a.dtype, int(a.max_shard_gb * (1 << 30)), a.tower_dir)
  print(f"saisa-export: wrote {paths.absolute(a.out)} ({a.layout}, {a.dtype})")


if __name__ == "__main__":
  main()
