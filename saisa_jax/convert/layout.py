"""Name and layout rules between our param tree and PyTorch / HF state dicts.

One rule maps one of our leaves (a path in the Flax params, stacked over layers when
the name has `{l}`) to one PyTorch tensor name. Linear weights are [out, in] in
PyTorch and kernels [in..., out...] here: `W.T` reshaped to the kernel's shape.

Prefixes used by the checkpoints we read and write:
  LlamaForCausalLM / released SAISA:  "model."  (+ "lm_head.weight")
  HF LlavaForConditionalGeneration:   "model.language_model."
  CLIPVisionModel:                    "" (transformers 5; older files: "vision_model.")
  released SAISA tower:               "model.vision_tower.vision_tower.vision_model."
  HF Llava tower:                     "model.vision_tower."
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping

import numpy as np

from saisa_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: tuple[str, ...]   # path in params, e.g. ("decoder", "layers", "q_proj", "kernel")
  theirs: str             # torch name; "{l}" marks a stacked layer index
  kind: str = "copy"      # copy | linear | patch | grouped
  in_dims: int = 1        # for linear: leading kernel axes that are the input


def llama_rules(cfg: ModelConfig, prefix: str = "model.", head: str = "lm_head.weight") -> list[Rule]:
  layer = prefix + "layers.{l}."
  d = ("decoder", "layers")
  rules = [Rule(("decoder", "embedding", "embedding"), prefix + "embed_tokens.weight"),
           Rule(("decoder", "norm", "scale"), prefix + "norm.weight")]
  for name, torch_name in [("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                           ("v_proj", "self_attn.v_proj"), ("gate_proj", "mlp.gate_proj"),
                           ("up_proj", "mlp.up_proj"), ("down_proj", "mlp.down_proj")]:
    rules.append(Rule(d + (name, "kernel"), layer + torch_name + ".weight", "linear"))
  rules.append(Rule(d + ("o_proj", "kernel"), layer + "self_attn.o_proj.weight", "linear", 2))
  rules.append(Rule(d + ("input_norm", "scale"), layer + "input_layernorm.weight"))
  rules.append(Rule(d + ("post_norm", "scale"), layer + "post_attention_layernorm.weight"))
  if not cfg.llm.tie_embeddings:
    rules.append(Rule(("decoder", "lm_head", "kernel"), head, "linear"))
  return rules


def projector_rules(ours: tuple[str, ...], theirs: str, names=("0", "2")) -> list[Rule]:
  """mlp2x_gelu: theirs + "{0,2}.{weight,bias}" (LLaVA) or linear_{1,2} (HF Llava)."""
  out = []
  for fc, idx in zip(("fc1", "fc2"), names):
    out.append(Rule(ours + (fc, "kernel"), f"{theirs}{idx}.weight", "linear"))
    out.append(Rule(ours + (fc, "bias"), f"{theirs}{idx}.bias"))
  return out


def saisa_projector_rules(prefix: str = "model.") -> list[Rule]:
  return projector_rules(("decoder", "layers", "projector"), prefix + "layers.{l}.mm_projector.")


def clip_rules(prefix: str = "") -> list[Rule]:
  v, layer = ("vision",), prefix + "encoder.layers.{l}."
  rules = [Rule(v + ("patch_embed", "kernel"), prefix + "embeddings.patch_embedding.weight", "patch"),
           Rule(v + ("class_embedding",), prefix + "embeddings.class_embedding"),
           Rule(v + ("position_embedding",), prefix + "embeddings.position_embedding.weight"),
           Rule(v + ("pre_layernorm", "scale"), prefix + "pre_layrnorm.weight"),
           Rule(v + ("pre_layernorm", "bias"), prefix + "pre_layrnorm.bias")]
  lv = v + ("layers",)
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    in_dims = 2 if name == "out_proj" else 1
    rules.append(Rule(lv + (name, "kernel"), layer + f"self_attn.{name}.weight", "linear", in_dims))
    rules.append(Rule(lv + (name, "bias"), layer + f"self_attn.{name}.bias"))
  for name in ("fc1", "fc2"):
    rules.append(Rule(lv + (name, "kernel"), layer + f"mlp.{name}.weight", "linear"))
    rules.append(Rule(lv + (name, "bias"), layer + f"mlp.{name}.bias"))
  for name in ("layer_norm1", "layer_norm2"):
    rules.append(Rule(lv + (name, "scale"), layer + f"{name}.weight"))
    rules.append(Rule(lv + (name, "bias"), layer + f"{name}.bias"))
  return rules


def eas_rules(prefix: str = "model.", kept_adapters: bool = False) -> list[Rule]:
  """EAS's PIA adapters (models/eas.py) as the package's PyTorch model names them
  (convert/torch_saisa.PIA): Linear down / cross / router, grouped Conv1d up_b / up_d;
  with kept_adapters also the kept layers' (torch_saisa.KeptAdapter, no cross)."""
  rules = []
  adapters = [("pia", ("down", "cross", "router", "up_b", "up_d"))]
  if kept_adapters:
    adapters.append(("kept_adapter", ("down", "router", "up_b", "up_d")))
  for module, names in adapters:
    ours, layer = ("decoder", "layers", module), prefix + "layers.{l}." + module + "."
    for name in names:
      kind = "grouped" if name.startswith("up_") else "linear"
      rules.append(Rule(ours + (f"{name}_kernel",), layer + f"{name}.weight", kind))
      rules.append(Rule(ours + (f"{name}_bias",), layer + f"{name}.bias"))
  return rules


def is_stacked(rule: Rule) -> bool:
  return "{l}" in rule.theirs


def to_ours(rule: Rule, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """One torch tensor -> our layout with `shape` (of one layer when stacked)."""
  t = np.asarray(tensor)
  if rule.kind == "linear":
    t = t.T
  elif rule.kind == "patch":
    t = t.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  elif rule.kind == "grouped":  # Conv1d [C, h/g, 1] -> [g, h/g, C/g]
    g = shape[0]
    t = t[:, :, 0].reshape(g, t.shape[0] // g, t.shape[1]).transpose(0, 2, 1)
  if int(np.prod(t.shape)) != int(np.prod(shape)):
    raise ValueError(f"{rule.theirs}: shape {tuple(tensor.shape)} does not fit "
                     f"{'/'.join(rule.ours)} {tuple(shape)} (check the config's sizes)")
  return t.reshape(shape)


def to_theirs(rule: Rule, value: np.ndarray) -> np.ndarray:
  """One of our leaves (one layer when stacked) -> the torch tensor."""
  v = np.asarray(value)
  if rule.kind == "linear":
    n_in = int(np.prod(v.shape[:rule.in_dims]))
    return np.ascontiguousarray(v.reshape(n_in, -1).T)
  if rule.kind == "patch":
    return np.ascontiguousarray(v.transpose(3, 2, 0, 1))
  if rule.kind == "grouped":  # [g, h/g, C/g] -> Conv1d [C, h/g, 1]
    g, hg, cg = v.shape
    return np.ascontiguousarray(v.transpose(0, 2, 1).reshape(g * cg, hg, 1))
  return v


def model_rules(cfg: ModelConfig, layout: str) -> list[Rule]:
  """All rules of a model for one checkpoint layout: 'saisa' (released) or 'hf_llava'."""
  if layout == "saisa":
    rules = llama_rules(cfg, "model.") + clip_rules("model.vision_tower.vision_tower.vision_model.")
    if cfg.eas is not None:
      if cfg.alignment != "saisa":
        raise ValueError(f"an EAS model of alignment {cfg.alignment!r}: the package's PyTorch "
                         "model runs EAS for SAISA only; export a saisa-mode model")
      rules += eas_rules("model.", cfg.eas.kept_adapters)
    if cfg.alignment == "saisa":
      return rules + saisa_projector_rules("model.")
    return rules + projector_rules(("projector",), "model.mm_projector.")
  if layout == "hf_llava":
    if cfg.eas is not None:
      raise ValueError("Hugging Face Llava has no EAS adapters: export an EAS model with "
                       "--layout saisa (alignment saisa)")
    return (llama_rules(cfg, "model.language_model.") + clip_rules("model.vision_tower.")
            + projector_rules(("projector",), "model.multi_modal_projector.linear_", ("1", "2")))
  raise ValueError(f"unknown checkpoint layout {layout!r} (saisa | hf_llava)")


def expand(rule: Rule, num_layers: int) -> Iterator[tuple[int | None, str]]:
  if is_stacked(rule):
    for l in range(num_layers):
      yield l, rule.theirs.format(l=l)
  else:
    yield None, rule.theirs


def layer_count(cfg: ModelConfig, rule: Rule) -> int:
  return cfg.vision.layers_used if rule.ours[0] == "vision" else cfg.llm.num_layers


def params_from_tensors(get: Callable[[str], np.ndarray], rules: list[Rule],
                        shapes: Mapping, cfg: ModelConfig) -> dict:
  """Builds a nested numpy params dict. `get(name)` returns a torch-layout tensor;
  `shapes` is the params tree of ShapeDtypeStructs (jax.eval_shape of init)."""
  out: dict = {}
  for rule in rules:
    shape = _lookup(shapes, rule.ours).shape
    if is_stacked(rule):
      value = np.stack([to_ours(rule, get(name), shape[1:])
                        for _, name in expand(rule, layer_count(cfg, rule))])
    else:
      value = to_ours(rule, get(rule.theirs), shape)
    _assign(out, rule.ours, value.astype(np.float32))
  return out


def tensors_from_params(params: Mapping, rules: list[Rule], cfg: ModelConfig) -> dict:
  """Our params -> {torch name: numpy array} (float32)."""
  out = {}
  for rule in rules:
    value = np.asarray(_lookup(params, rule.ours), np.float32)
    for l, name in expand(rule, layer_count(cfg, rule)):
      out[name] = to_theirs(rule, value if l is None else value[l])
  return out


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _assign(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------- streaming
# Added for saisa-import / saisa-export, which never hold a second full copy of a model:
# they need the torch-side shape of every tensor before any tensor is read or written.

def theirs_shape(rule: Rule, our_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of one tensor (one layer when stacked) from our leaf's shape."""
  if rule.kind == "linear":
    n_in = int(np.prod(our_shape[:rule.in_dims]))
    return (int(np.prod(our_shape[rule.in_dims:])), n_in)
  if rule.kind == "patch":
    kh, kw, cin, cout = our_shape
    return (cout, cin, kh, kw)
  if rule.kind == "grouped":
    g, hg, cg = our_shape
    return (g * cg, hg, 1)
  if rule.ours[-1] == "bias":  # q/k/v biases are [heads, head_dim] here, flat in torch
    return (int(np.prod(our_shape)),)
  return tuple(our_shape)


def layer_shape(rule: Rule, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Our leaf shape without the stacked layer axis (when the rule is stacked)."""
  return tuple(leaf_shape[1:]) if is_stacked(rule) else tuple(leaf_shape)


def clip_tail_names(cfg: ModelConfig, prefix: str = "") -> list[str]:
  """Tensors a complete CLIPVisionModel has that our params never hold: the layers
  after `layers_used` (they cannot change hidden_states[select_layer]) and the
  post_layernorm (applied to the pooled output only)."""
  names = [prefix + "post_layernorm.weight", prefix + "post_layernorm.bias"]
  per_layer = ([f"self_attn.{n}.{p}" for n in ("q_proj", "k_proj", "v_proj", "out_proj")
                for p in ("weight", "bias")]
               + [f"mlp.{n}.{p}" for n in ("fc1", "fc2") for p in ("weight", "bias")]
               + [f"{n}.{p}" for n in ("layer_norm1", "layer_norm2") for p in ("weight", "bias")])
  for l in range(cfg.vision.layers_used, cfg.vision.num_layers):
    names += [f"{prefix}encoder.layers.{l}.{n}" for n in per_layer]
  return names


def clip_tail_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
  """Shape of a `clip_tail_names` tensor."""
  c, m = cfg.vision.hidden_size, cfg.vision.intermediate_size
  if name.endswith("fc1.weight"):
    return (m, c)
  if name.endswith("fc1.bias"):
    return (m,)
  if name.endswith("fc2.weight") or name.endswith("proj.weight"):
    return (c, m) if "fc2" in name else (c, c)
  return (c,)


def canonical_name(name: str) -> str:
  """One spelling for the names of the same tensor across checkpoint generations:

    language_model.model.X   -> model.language_model.X   (HF Llava, saved by transformers)
    language_model.lm_head.X -> lm_head.X
    vision_tower.X           -> model.vision_tower.X
    multi_modal_projector.X  -> model.multi_modal_projector.X
    ...vision_model.X        -> ...X  (CLIPVisionModel before / after transformers 5)
  """
  for old, new in (("language_model.model.", "model.language_model."),
                   ("language_model.lm_head.", "lm_head."),
                   ("vision_tower.", "model.vision_tower."),
                   ("multi_modal_projector.", "model.multi_modal_projector.")):
    if name.startswith(old):
      name = new + name[len(old):]
      break
  if name.startswith("vision_model."):
    name = name[len("vision_model."):]
  return name.replace(".vision_model.", ".")
