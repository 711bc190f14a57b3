"""Frozen model configs (hashable, so Flax modules can hold them).

They are built from the ml-collections `config.model` section by `from_config`;
configs/ and saisa_jax/presets.py hold the numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

ATTENTION_IMPLS = ("einsum", "cpu", "dot_product", "cudnn", "flash", "flash_interpret")  # attend
ALIGNMENTS = ("llava", "naavit", "saisa")
LAYER_LAYOUTS = ("stacked", "per_layer")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None  # None: hidden_size // num_heads
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  # None, or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos).
  rope_scaling: Optional[tuple] = None
  tie_embeddings: bool = False

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int          # layers of the full tower (as in its checkpoint)
  num_heads: int
  layer_norm_eps: float = 1e-5
  select_layer: int = -2   # index into HF hidden_states (0 = embeddings)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def layers_used(self) -> int:
    """Layers that must run to produce hidden_states[select_layer]."""
    n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
    if not 0 <= n <= self.num_layers:
      raise ValueError(f"vision.select_layer={self.select_layer} is outside a "
                       f"{self.num_layers}-layer tower")
    return n


@dataclasses.dataclass(frozen=True)
class EASConfig:
  """EAS (../shared/reference/eas.md): attention sublayers skipped, a PIA adapter per
  layer. A skipped layer computes x + FFN(gamma2 * PIA(RMSNorm1(x))) and has no
  keys/values (models/eas.py). With kept_adapters a kept layer's attention reads
  KeptAdapter(RMSNorm1(x)) instead of RMSNorm1(x) (the authors' code: a small adapter
  before attention)."""
  skip: tuple = ()           # layer indices whose attention is skipped (sorted, unique)
  width: int = 256           # PIA hidden width h
  groups: int = 2            # PIA's up-projections B, D: block-diagonal in this many groups
  temperature: float = 10.0  # router softmax temperature T
  scale: float = 1.0         # s
  up_init: str = "zeros"     # B, D init: zeros (PIA starts as the identity) | xavier
  # Serving: fold each skipped layer's PIA and gamma2 into its FFN's gate / up weights
  # per sequence after the prefill, so a decode step there is one norm + one FFN.
  fold: bool = False
  # Kept layers carry an adapter before their attention (width kept_width, the same
  # groups, temperature, scale and up_init; the authors used 128 for LLaVA).
  kept_adapters: bool = False
  kept_width: int = 128

  def __post_init__(self):
    if self.up_init not in ("zeros", "xavier"):
      raise ValueError(f"model.eas.up_init={self.up_init!r}; choose zeros or xavier")
    if self.width <= 0 or self.width % self.groups:
      raise ValueError(f"model.eas.width={self.width} must be a positive multiple of "
                       f"model.eas.groups={self.groups}")
    if self.kept_adapters and (self.kept_width <= 0 or self.kept_width % self.groups):
      raise ValueError(f"model.eas.kept_width={self.kept_width} must be a positive multiple "
                       f"of model.eas.groups={self.groups}")
    if len(set(self.skip)) != len(self.skip) or tuple(sorted(self.skip)) != tuple(self.skip):
      raise ValueError(f"model.eas.skip={self.skip}: list each layer once, in order")

  def kinds(self, num_layers: int) -> tuple:
    """Per layer: True where its attention is skipped."""
    bad = [l for l in self.skip if not 0 <= l < num_layers]
    if bad:
      raise ValueError(f"model.eas.skip names layers {bad}; the LLM has layers "
                       f"0..{num_layers - 1}")
    return tuple(l in self.skip for l in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  llm: LlamaConfig
  vision: VisionConfig
  alignment: str = "saisa"
  dtype: str = "float32"        # compute dtype; params are always float32
  remat: str = "none"           # none | full | dots | dots_no_batch
  scan_unroll: int = 1          # layers unrolled per scan step (num_layers: fully)
  # The implementation attention.attend calls (saisa_jax/backends/attention/):
  # einsum | cpu (fused C++ kernel for XLA:CPU, float32: backends/cpu/attention.py) |
  # dot_product (jax.nn.dot_product_attention, its XLA implementation) | cudnn
  # (the same call with cuDNN's fused flash attention: NVIDIA GPUs, bf16/fp16) | flash
  # (Pallas TPU kernel, mask as positions: backends/attention/flash_tpu.py) | flash_interpret (the
  # same kernel interpreted, any backend; slow, for tests). Decoder and tower use it.
  attention: str = "einsum"
  # Flash attention tile (query rows = key columns), a multiple of 128.
  flash_block: int = 256
  # Query rows per block of causal block skipping in the decoder (attention.py); 0: off.
  attention_block: int = 128
  # SAISA's visual K/V of all layers, computed before the text runs: "scan" (layer by
  # layer) or "vmap" (one batched pass over the stacked layers). scan is the default:
  # on XLA:CPU the layer-batched matmuls run slowly (smollm2 prefill 576 -> 443 ms with
  # scan, train step -4%), and at scale the batched backward holds every layer's
  # projector activations at once (+5.4 GiB per chip, 7B stage 2 on v5p-64). vmap is
  # slightly faster at 2 layers (the embedded task).
  visual_pass: str = "scan"
  # How the module holds its layers (decoder and tower): "stacked" (one params subtree
  # with a leading [layers] axis, run by nn.scan: training, checkpoints, exports) or
  # "per_layer" (layers_0, layers_1, ...: a Python loop; models/stack.py). Configs
  # always build stacked; serving converts to what serve_layout names
  # (backends/serving.py: per layer on CPU, where XLA copies each slice of a scan's
  # stacks before using it).
  layer_layout: str = "stacked"
  # The layout eval, chat and saisa-bench serve with (backends/serving.py): auto
  # (per_layer on a CPU backend, else stacked: accelerators' scans slice in place and
  # compile once per layer stack), stacked or per_layer.
  serve_layout: str = "auto"
  # EAS adapters and skipped layers (None: a model without them).
  eas: Optional[EASConfig] = None

  @property
  def skipped(self) -> tuple:
    """Per decoder layer: True where EAS skips its attention."""
    return self.eas.kinds(self.llm.num_layers) if self.eas else (False,) * self.llm.num_layers

  @property
  def kept_adapters(self) -> bool:
    """Do the kept layers carry EAS's adapter before their attention?"""
    return self.eas is not None and self.eas.kept_adapters

  def head_dims(self):
    """(name, head dim) of the decoder and the tower: what attention kernels check."""
    return (("llm", self.llm.dim_per_head),
            ("vision", self.vision.hidden_size // self.vision.num_heads))

  def __post_init__(self):
    for name, value, allowed in (("layer_layout", self.layer_layout, LAYER_LAYOUTS),
                                 ("serve_layout", self.serve_layout, ("auto",) + LAYER_LAYOUTS)):
      if value not in allowed:
        raise ValueError(f"model.{name}={value!r}; choose one of {allowed}")
    if self.layer_layout == "per_layer" and self.remat != "none":
      raise ValueError("model.layer_layout=per_layer is the serving layout and has no "
                       f"remat; got model.remat={self.remat!r}: train with "
                       "layer_layout=stacked")
    if self.alignment not in ALIGNMENTS:
      raise ValueError(f"model.alignment={self.alignment!r}; choose one of {ALIGNMENTS}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention={self.attention!r}; choose einsum, cpu (CPU), "
                       "dot_product, cudnn (GPU), flash (TPU) or flash_interpret")
    # What the implementation itself cannot run (head dims, dtypes): its own check.
    from saisa_jax.backends import attention as impls
    impls.get(self.attention).check(self)
    if self.flash_block <= 0 or self.flash_block % 128:
      raise ValueError(f"model.flash_block={self.flash_block}; use a positive multiple of "
                       "128 (TPU lanes)")
    if self.attention_block < 0:
      raise ValueError(f"model.attention_block={self.attention_block}; use 0 (off) or a "
                       "positive number of query rows per block")
    if self.visual_pass not in ("vmap", "scan"):
      raise ValueError(f"model.visual_pass={self.visual_pass!r}; choose vmap or scan")
    if self.eas is not None:
      self.eas.kinds(self.llm.num_layers)
      if self.llm.hidden_size % self.eas.groups:
        raise ValueError(f"model.eas.groups={self.eas.groups} does not divide the LLM "
                         f"width {self.llm.hidden_size}")

  @property
  def num_visual(self) -> int:
    return self.vision.num_patches


def _rope_scaling(value) -> Optional[tuple]:
  if not value:
    return None
  value = dict(value)
  kind = value.get("rope_type", value.get("type"))
  if kind != "llama3":
    raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
  return ("llama3", float(value["factor"]), float(value["low_freq_factor"]),
          float(value["high_freq_factor"]), int(value["original_max_position_embeddings"]))


def eas_from_config(section) -> Optional[EASConfig]:
  """config.model.eas (absent, or enabled=False: no EAS) -> EASConfig."""
  if not section or not section.get("enabled", True):
    return None
  fields = {f.name for f in dataclasses.fields(EASConfig)}
  unknown = sorted(set(dict(section)) - fields - {"enabled"})
  if unknown:
    raise ValueError(f"config.model.eas has unknown fields {unknown}; known: {sorted(fields)}")
  kw = {k: v for k, v in dict(section).items() if k in fields}
  if "skip" in kw:
    skip = kw["skip"]
    if isinstance(skip, str):
      skip = [int(t) for t in skip.replace(",", " ").split()]
    kw["skip"] = tuple(sorted(int(l) for l in skip))
  return EASConfig(**kw)


def from_config(model: Any) -> ModelConfig:
  """ml_collections `config.model` (or a dict) -> ModelConfig."""
  get = (lambda d, k, default=None: d.get(k, default))
  if get(model, "layer_layout") not in (None, "stacked"):
    # Training, checkpoints and exports are stacked; serving converts (layer_layout.py).
    raise ValueError(f"config.model.layer_layout={get(model, 'layer_layout')!r}: configs "
                     "train and store stacked layers; set model.serve_layout=per_layer to "
                     "serve per layer")
  llm = dict(model["llm"])
  llm["rope_scaling"] = _rope_scaling(llm.get("rope_scaling"))
  llm_fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  vis_fields = {f.name for f in dataclasses.fields(VisionConfig)}
  return ModelConfig(
      llm=LlamaConfig(**{k: v for k, v in llm.items() if k in llm_fields}),
      vision=VisionConfig(**{k: v for k, v in dict(model["vision"]).items() if k in vis_fields}),
      alignment=get(model, "alignment", "saisa"),
      dtype=get(model, "dtype", "float32"),
      remat=get(model, "remat", "none"),
      scan_unroll=int(get(model, "scan_unroll", 1)),
      attention=get(model, "attention", "einsum"),
      attention_block=int(get(model, "attention_block", 128)),
      flash_block=int(get(model, "flash_block", 256)),
      visual_pass=get(model, "visual_pass", "scan"),
      serve_layout=get(model, "serve_layout", "auto"),
      eas=eas_from_config(get(model, "eas")),
  )
