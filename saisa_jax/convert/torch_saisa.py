"""Independent PyTorch reference implementation of SAISA (oracle + small runtime).

This module deliberately imports nothing from ``saisa_jax`` and no JAX: it is the
oracle the JAX model is checked against, built only from Hugging Face ``transformers``
LLaMA / CLIP building blocks, with attention written out explicitly.

Architecture (see shared/reference/saisa.md): for every decoder layer ``l`` a projector
``P_l = Linear(mm_hidden -> d) -> GELU(erf) -> Linear(d -> d)`` maps the frozen CLIP
features ``f`` (tower ``hidden_states[mm_vision_select_layer]``, CLS dropped) into the
input space of that layer's self-attention:

    x_vis_l = P_l(f);  h = input_layernorm_l(x_vis_l)
    K_vis_l = RoPE(k_proj_l(h)) at the image's positions,  V_vis_l = v_proj_l(h)

Text tokens run the normal LLaMA layer but attend over ``[visual; text]`` keys. Visual
rows have no query / o_proj / MLP / residual and nothing carries over between layers.

Positions: for a row ``[text A (s tokens)][<image> placeholder][text B]`` text A has
positions ``0..s-1``, the V visual keys ``s..s+V-1`` and text B ``s+V, s+V+1, ...``.
Mask: text queries are causal over text (and respect ``attention_mask``); a text query
sees all visual keys iff it comes after the image.

Public API
----------
``SaisaForCausalLM(config, vision_config=None, with_global_projector=False)``
    ``config`` is a ``transformers.LlamaConfig`` carrying the extra ``mm_*`` attributes
    (``mm_hidden_size``, ``mm_vision_select_layer``, ...; defaults are filled in).
``SaisaForCausalLM.forward(input_ids, pixel_values=None, attention_mask=None,
                           return_text_mask=False)``
    ``input_ids``: LongTensor [B, T] with at most one ``IMAGE_TOKEN_INDEX`` (-200) per
    row (rows without one are text-only). ``pixel_values``: [B, 3, H, W] (one image per
    row; the entry of a text-only row is ignored) or [N_img, 3, H, W] with one image per
    image row in row order, or None when no row has an image. ``attention_mask``:
    optional [B, T] (right padding; the placeholder position counts as a real token).
    Returns logits float [B, T_out, vocab] with ``T_out = T - 1`` if every row holds an
    image, else ``T``. ``logits[b, j]`` is the logit of the j-th non-placeholder token of
    row ``b`` (i.e. ``input_ids[b]`` with its -200 entry deleted). Slots that do not
    correspond to a real token (the filler slot at the end of image rows when
    ``T_out == T``, and positions with ``attention_mask == 0``) are set to 0. With
    ``return_text_mask=True`` returns ``(logits, text_mask)`` where ``text_mask`` [B,
    T_out] bool marks the real slots.
``SaisaForCausalLM.greedy_generate(input_ids, pixel_values=None, max_new_tokens=32,
                                   eos_token_id=None) -> LongTensor [B, n_new]``
    Full recompute each step; returns only the new tokens. Rows must be unpadded and of
    equal length (batch size 1 is the intended use). Finished rows are padded with eos.
``SaisaForCausalLM.from_pretrained(directory, dtype=torch.float32, vision_tower_path=None)``
``SaisaForCausalLM.save_pretrained(directory, max_shard_size=4 GiB, include_vision_tower=True)``
``SaisaForCausalLM.released_state_dict()``: state dict with on-disk (release) names.
``build_random(llama_config_kwargs, clip_config_kwargs, seed, with_global_projector=False)``

On-disk names: exactly the release's, i.e. LLaMA names, ``model.layers.{l}.mm_projector.
{0,2}.{weight,bias}``, optional ``model.mm_projector.{0,2}.*`` and the tower as
``model.vision_tower.vision_tower.vision_model.*`` (transformers 4.x CLIPVisionModel
names). In memory the tower sits at ``model.vision_tower.vision_tower`` (an HF
``CLIPVisionModel``); recent transformers versions drop the ``vision_model.`` level from
the in-memory names, which ``released_state_dict`` / loading translate. Loading accepts
both spellings, and a separate tower directory may be a CLIPVisionModel or a full
CLIPModel directory (text weights ignored).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

IMAGE_TOKEN_INDEX = -200

TOWER_PREFIX = "model.vision_tower.vision_tower."
RELEASE_TOWER_PREFIX = TOWER_PREFIX + "vision_model."

MM_DEFAULTS: dict[str, Any] = {
    "mm_vision_tower": None,
    "mm_hidden_size": 1024,
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_projector_type": "mlp2x_gelu",
    "image_aspect_ratio": "pad",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
}

_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
# Keys present in some checkpoints that are buffers here (non-persistent) or unused.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


# ----------------------------------------------------------------------------- helpers

def _mixed_up(up_b: nn.Conv1d, up_d: nn.Conv1d, z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """EAS's two grouped up-projections of z [B, T, width], mixed by the router's
    r [B, 1 or T, 2]: r1 up_b(z) + r2 up_d(z) -> [B, T, C]."""
    zt = z.transpose(1, 2)
    return r[..., 0:1] * up_b(zt).transpose(1, 2) + r[..., 1:2] * up_d(zt).transpose(1, 2)


class PIA(nn.Module):
    """EAS's Propagation-of-Information Adapter (shared/reference/eas.md), on
    normalised rows h [B, T, C]: u = down(mean h), r = softmax(router(mean h) / T) over
    the context rows; z = (u + cross(h)) / 2; PIA(h) = h + s (r1 up_b(z) + r2 up_d(z)),
    up_b / up_d grouped 1x1 convolutions (block-diagonal linears)."""

    def __init__(self, dim: int, width: int, groups: int, temperature: float, scale: float):
        super().__init__()
        self.temperature, self.scale = temperature, scale
        self.down = nn.Linear(dim, width)
        self.cross = nn.Linear(dim, width)
        self.router = nn.Linear(dim, 2)
        self.up_b = nn.Conv1d(width, dim, 1, groups=groups)
        self.up_d = nn.Conv1d(width, dim, 1, groups=groups)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        w = context.to(h.dtype)[:, :, None]
        mean = (h * w).sum(1) / w.sum(1).clamp(min=1.0)                 # [B, C]
        u = self.down(mean)
        r = torch.softmax(self.router(mean) / self.temperature, dim=-1)
        z = 0.5 * (u[:, None] + self.cross(h))                          # [B, T, width]
        return h + self.scale * _mixed_up(self.up_b, self.up_d, z, r[:, None])


class KeptAdapter(nn.Module):
    """EAS's adapter before a kept layer's attention (models/eas.py KeptAdapter), on
    normalised rows h [B, T, C]: r = softmax(router(h) / T) per row; z = down(h);
    h + s (r1 up_b(z) + r2 up_d(z)), up_b / up_d grouped 1x1 convolutions."""

    def __init__(self, dim: int, width: int, groups: int, temperature: float, scale: float):
        super().__init__()
        self.temperature, self.scale = temperature, scale
        self.down = nn.Linear(dim, width)
        self.router = nn.Linear(dim, 2)
        self.up_b = nn.Conv1d(width, dim, 1, groups=groups)
        self.up_d = nn.Conv1d(width, dim, 1, groups=groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = torch.softmax(self.router(h.float()) / self.temperature, dim=-1).to(h.dtype)
        return h + self.scale * _mixed_up(self.up_b, self.up_d, self.down(h), r)


def make_projector(in_dim: int, d: int) -> nn.Sequential:
    """The release's ``mlp2x_gelu`` projector: Linear -> GELU (exact erf) -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, d), nn.GELU(approximate="none"), nn.Linear(d, d))


def _tower_uses_vision_model_prefix() -> bool:
    """Whether this transformers version's CLIPVisionModel names start with ``vision_model.``."""
    cfg = CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=8, intermediate_size=8,
                           num_hidden_layers=1, num_attention_heads=1)
    with torch.device("meta"):
        m = CLIPVisionModel(cfg)
    return any(k.startswith("vision_model.") for k in m.state_dict())


_TOWER_HAS_PREFIX: bool | None = None


def _tower_prefix_flag() -> bool:
    global _TOWER_HAS_PREFIX
    if _TOWER_HAS_PREFIX is None:
        _TOWER_HAS_PREFIX = _tower_uses_vision_model_prefix()
    return _TOWER_HAS_PREFIX


def _tower_key_to_memory(key: str) -> str:
    """Tower key relative to the CLIPVisionModel (either spelling) -> in-memory spelling."""
    has = key.startswith("vision_model.")
    if _tower_prefix_flag():
        return key if has else "vision_model." + key
    return key[len("vision_model."):] if has else key


def _tower_key_to_release(key: str) -> str:
    return key if key.startswith("vision_model.") else "vision_model." + key


def read_safetensors_dir(directory: str) -> dict[str, torch.Tensor]:
    """Read all tensors of an HF-style safetensors directory (single file or sharded)."""
    idx = os.path.join(directory, _SAFE_INDEX)
    if os.path.exists(idx):
        with open(idx) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, _SAFE_SINGLE)):
        files = [_SAFE_SINGLE]
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {directory!r}")
    out: dict[str, torch.Tensor] = {}
    for fn in files:
        with safe_open(os.path.join(directory, fn), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _config_kwargs(d: dict) -> dict:
    d = dict(d)
    for k in ("model_type", "transformers_version", "architectures", "vision_config",
              "torch_dtype", "dtype", "_name_or_path"):
        d.pop(k, None)
    if "rope_parameters" in d and d["rope_parameters"] is not None:
        # Legacy duplicates written for transformers 4.x readers.
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
    return d


def _clip_vision_config_from_dict(d: dict) -> CLIPVisionConfig:
    if d.get("model_type") == "clip" or "vision_config" in d:
        d = d["vision_config"]
    return CLIPVisionConfig(**_config_kwargs(d))


def _resolve_tower_dir(name: str | None, model_dir: str | None) -> str | None:
    if not name:
        return None
    cands = [name]
    if model_dir is not None and not os.path.isabs(name):
        cands.append(os.path.join(model_dir, name))
    for c in cands:
        if os.path.isdir(c) and os.path.exists(os.path.join(c, "config.json")):
            return c
    return None


def _fix_meta_buffers(module: nn.Module, config: LlamaConfig) -> None:
    """Recreate non-persistent buffers left on the meta device by meta-init + assign-load."""
    for name, sub in module.named_modules():
        if isinstance(sub, LlamaRotaryEmbedding):
            if any(b.is_meta for b in sub.buffers()):
                fresh = LlamaRotaryEmbedding(config=config)
                for bname, b in fresh.named_buffers(recurse=False):
                    setattr(sub, bname, b)
                sub.attention_scaling = fresh.attention_scaling
        for bname, b in list(sub.named_buffers(recurse=False)):
            if not b.is_meta:
                continue
            if bname == "position_ids":
                setattr(sub, bname, torch.arange(b.shape[-1]).expand(b.shape).clone())
            else:
                raise RuntimeError(f"buffer {name}.{bname} could not be materialised")


# ----------------------------------------------------------------------------- modules

class SaisaVisionTower(nn.Module):
    """Wrapper named like the release's CLIPVisionTower: the HF model sits at ``.vision_tower``."""

    def __init__(self, vision_config: CLIPVisionConfig, select_layer: int = -2,
                 select_feature: str = "patch"):
        super().__init__()
        self.vision_tower = CLIPVisionModel(vision_config)
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> float32 features [N, V, mm_hidden_size]."""
        out = self.vision_tower(pixel_values.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        elif self.select_feature != "cls_patch":
            raise ValueError(f"unexpected mm_vision_select_feature {self.select_feature!r}")
        return feats.float()


class SaisaModel(nn.Module):
    """Holds the LLaMA trunk (+ per-layer projectors), the vision tower and the global projector."""

    def __init__(self, config: LlamaConfig, vision_config: CLIPVisionConfig | None,
                 with_global_projector: bool = False):
        super().__init__()
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d, config.pad_token_id)
        self.layers = nn.ModuleList()
        eas = getattr(config, "eas", None) or None
        for i in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, i)
            layer.mm_projector = make_projector(config.mm_hidden_size, d)
            if eas:
                layer.pia = PIA(d, eas["width"], eas["groups"], eas["temperature"], eas["scale"])
                if eas.get("kept_adapters"):
                    layer.kept_adapter = KeptAdapter(d, eas["kept_width"], eas["groups"],
                                                     eas["temperature"], eas["scale"])
            self.layers.append(layer)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        if vision_config is not None:
            self.vision_tower = SaisaVisionTower(
                vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature)
        else:
            self.vision_tower = None
        # The LLaVA global projector: loaded/saved, unused by SAISA inference.
        self.mm_projector = make_projector(config.mm_hidden_size, d) if with_global_projector else None


class SaisaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, vision_config: CLIPVisionConfig | None = None,
                 with_global_projector: bool = False):
        super().__init__()
        for k, v in MM_DEFAULTS.items():
            if not hasattr(config, k):
                setattr(config, k, v)
        if vision_config is not None and config.mm_hidden_size != vision_config.hidden_size:
            raise ValueError("mm_hidden_size must equal the vision tower's hidden_size")
        self.config = config
        self.vision_config = vision_config
        self.model = SaisaModel(config, vision_config, with_global_projector)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # ------------------------------------------------------------------ basics
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision features (float32) [N, V, mm_hidden_size]: hidden_states[select_layer], CLS dropped."""
        if self.model.vision_tower is None:
            raise RuntimeError("this model has no vision tower loaded")
        return self.model.vision_tower(pixel_values)

    # ------------------------------------------------------------------ layout
    def _layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        B, T = input_ids.shape
        dev = input_ids.device
        is_img = input_ids == IMAGE_TOKEN_INDEX
        n_img = is_img.sum(1)
        if bool((n_img > 1).any()):
            raise ValueError("at most one image placeholder per row is supported")
        has_img = n_img == 1
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        attention_mask = attention_mask.to(device=dev).bool()
        T_out = T - 1 if (B > 0 and bool(has_img.all())) else T
        txt_ids = torch.zeros(B, T_out, dtype=torch.long, device=dev)
        txt_valid = torch.zeros(B, T_out, dtype=torch.bool, device=dev)
        img_start = torch.zeros(B, dtype=torch.long, device=dev)  # = # text tokens before image
        for b in range(B):
            keep = ~is_img[b]
            ids_b = input_ids[b][keep]
            n = ids_b.shape[0]
            txt_ids[b, :n] = ids_b
            txt_valid[b, :n] = attention_mask[b][keep]
            if has_img[b]:
                s = int(is_img[b].nonzero()[0, 0])
                if not bool(attention_mask[b, s]):
                    raise ValueError("image placeholder lies in the padding")
                img_start[b] = s
        # Padding ids (and anything masked) are embedded as token 0; their outputs are zeroed.
        txt_ids = torch.where(txt_valid, txt_ids, torch.zeros_like(txt_ids))
        return has_img, img_start, txt_ids, txt_valid, T_out

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_text_mask: bool = False,
                prompt_lengths: torch.Tensor | None = None):
        """EAS (config.eas: skip, width, groups, temperature, scale): the layers in
        ``skip`` run x + MLP(post_attention_layernorm.weight * PIA(input_layernorm(x)))
        with no attention and no projector. PIA's context is the prompt: the first
        ``prompt_lengths[b]`` text tokens of row b (LongTensor [B]; default: all).
        With eas.kept_adapters the other layers' attention (text and visual K/V) reads
        kept_adapter(input_layernorm(x))."""
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        has_img, img_start, txt_ids, txt_valid, T_out = self._layout(input_ids, attention_mask)
        any_img = bool(has_img.any())

        # ---- vision features, one row per batch row (zeros for text-only rows)
        if any_img:
            if pixel_values is None:
                raise ValueError("input_ids contain an image placeholder but pixel_values is None")
            n_img_rows = int(has_img.sum())
            if pixel_values.shape[0] == B:
                pv = pixel_values[has_img]
            elif pixel_values.shape[0] == n_img_rows:
                pv = pixel_values
            else:
                raise ValueError(f"pixel_values has {pixel_values.shape[0]} images; expected {B} "
                                 f"(one per row) or {n_img_rows} (one per image row)")
            f_img = self.encode_images(pv.to(dev))
            V = f_img.shape[1]
            feats = f_img.new_zeros(B, V, f_img.shape[2])
            feats[has_img] = f_img
        else:
            V = 0
            feats = None

        # ---- positions
        j = torch.arange(T_out, device=dev)[None, :]
        after = has_img[:, None] & (j >= img_start[:, None])        # text after the image
        txt_pos = j + after.long() * V                               # [B, T_out]
        vis_pos = img_start[:, None] + torch.arange(V, device=dev)[None, :]  # [B, V]
        all_pos = torch.cat([vis_pos, txt_pos], dim=1)

        # ---- mask [B, T_out(q), V + T_out(k)]
        causal = torch.ones(T_out, T_out, dtype=torch.bool, device=dev).tril()
        txt_mask = causal[None] & txt_valid[:, None, :]
        vis_mask = after[:, :, None].expand(B, T_out, V)
        mask = torch.cat([vis_mask, txt_mask], dim=2)[:, None]      # [B, 1, Tq, Tk]

        x = self.model.embed_tokens(txt_ids)
        cos, sin = self.model.rotary_emb(x, all_pos)                 # [B, V+T_out, hd]
        cos_v, sin_v = cos[:, :V], sin[:, :V]
        cos_t, sin_t = cos[:, V:], sin[:, V:]

        eas = getattr(cfg, "eas", None) or {}
        skipped = set(eas.get("skip", ()))
        context = txt_valid
        if prompt_lengths is not None:
            context = txt_valid & (j < prompt_lengths.to(dev)[:, None])
        for index, layer in enumerate(self.model.layers):
            if index in skipped:
                h = layer.input_layernorm(x)
                x = x + layer.mlp(layer.post_attention_layernorm.weight * layer.pia(h, context))
                continue
            attn = layer.self_attn
            hd = attn.head_dim
            resid = x
            kept_adapter = getattr(layer, "kept_adapter", None)
            h = layer.input_layernorm(x)
            if kept_adapter is not None:
                h = kept_adapter(h)
            q = attn.q_proj(h).view(B, T_out, -1, hd).transpose(1, 2)
            k = attn.k_proj(h).view(B, T_out, -1, hd).transpose(1, 2)
            v = attn.v_proj(h).view(B, T_out, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos_t, sin_t)
            if V > 0:
                xv = layer.mm_projector(feats.to(layer.mm_projector[0].weight.dtype))
                hv = layer.input_layernorm(xv.to(x.dtype))
                if kept_adapter is not None:
                    hv = kept_adapter(hv)
                kv = attn.k_proj(hv).view(B, V, -1, hd).transpose(1, 2)
                vv = attn.v_proj(hv).view(B, V, -1, hd).transpose(1, 2)
                _, kv = apply_rotary_pos_emb(kv, kv, cos_v, sin_v)
                k = torch.cat([kv, k], dim=2)
                v = torch.cat([vv, v], dim=2)
            k = repeat_kv(k, attn.num_key_value_groups)
            v = repeat_kv(v, attn.num_key_value_groups)
            scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
            probs = torch.softmax(scores, dim=-1)
            o = torch.matmul(probs, v.float()).to(x.dtype)
            o = o.transpose(1, 2).reshape(B, T_out, -1)
            x = resid + attn.o_proj(o)
            resid = x
            x = resid + layer.mlp(layer.post_attention_layernorm(x))

        x = self.model.norm(x)
        logits = F.linear(x, self.output_weight()).float()
        logits = logits.masked_fill(~txt_valid[:, :, None], 0.0)
        if return_text_mask:
            return logits, txt_valid
        return logits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def greedy_generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                        max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None
                        ) -> torch.Tensor:
        """Greedy decoding by full recompute; returns only the new tokens [B, n_new]."""
        if isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = list(eos_token_id or [])
        ids = input_ids
        B = ids.shape[0]
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        new = []
        for _ in range(max_new_tokens):
            logits, tmask = self.forward(ids, pixel_values, return_text_mask=True)
            last = tmask.long().sum(1) - 1
            nxt = logits[torch.arange(B, device=ids.device), last].argmax(-1)
            if eos:
                nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)
                done = done | torch.isin(nxt, torch.tensor(eos, device=ids.device))
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos and bool(done.all()):
                break
        if not new:
            return ids.new_zeros(B, 0)
        return torch.stack(new, dim=1)

    # ------------------------------------------------------------------ state dicts
    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with the release's on-disk names (tower as ``...vision_tower.vision_model.*``)."""
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith(TOWER_PREFIX):
                k = TOWER_PREFIX + _tower_key_to_release(k[len(TOWER_PREFIX):])
            out[k] = v
        return out

    def load_released_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True,
                                 assign: bool = False):
        """Load a state dict with release names (either tower spelling accepted)."""
        mapped = {}
        for k, v in sd.items():
            if k.endswith(_IGNORABLE_SUFFIXES):
                continue
            if k.startswith(TOWER_PREFIX):
                k = TOWER_PREFIX + _tower_key_to_memory(k[len(TOWER_PREFIX):])
            mapped[k] = v
        return self.load_state_dict(mapped, strict=strict, assign=assign)

    # ------------------------------------------------------------------ config I/O
    def config_dict(self, include_vision_config: bool = True) -> dict:
        d = self.config.to_dict()
        d.pop("transformers_version", None)
        d["model_type"] = "llava_llama"
        d["architectures"] = ["LlavaLlamaForCausalLM"]
        for k, v in MM_DEFAULTS.items():
            d[k] = getattr(self.config, k, v)
        # Legacy rope keys so transformers 4.x style readers see the same rope.
        rp = dict(getattr(self.config, "rope_parameters", None) or {})
        if rp:
            d["rope_theta"] = rp.get("rope_theta", 10000.0)
            extra = {k: v for k, v in rp.items() if k != "rope_theta"}
            d["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
        d["torch_dtype"] = str(self.dtype).replace("torch.", "")
        d.pop("dtype", None)
        if include_vision_config and self.vision_config is not None:
            vc = self.vision_config.to_dict()
            vc.pop("transformers_version", None)
            d["vision_config"] = vc
        return d

    def save_pretrained(self, directory: str, max_shard_size: int = 4 * 1024 ** 3,
                        include_vision_tower: bool = True) -> None:
        os.makedirs(directory, exist_ok=True)
        sd = self.released_state_dict()
        if not include_vision_tower:
            sd = {k: v for k, v in sd.items() if not k.startswith(TOWER_PREFIX)}
        has_tower = any(k.startswith(TOWER_PREFIX) for k in sd)
        with open(os.path.join(directory, "config.json"), "w") as fh:
            json.dump(self.config_dict(include_vision_config=has_tower), fh, indent=2, sort_keys=True)
        # contiguous, non-aliased copies (safetensors refuses shared storage)
        sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(sd):
            nb = sd[k].numel() * sd[k].element_size()
            if shards[-1] and size + nb > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][k] = sd[k]
            size += nb
        for fn in os.listdir(directory):  # remove stale weights
            if fn.endswith(".safetensors") or fn == _SAFE_INDEX:
                os.remove(os.path.join(directory, fn))
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(directory, _SAFE_SINGLE), metadata=meta)
            return
        n = len(shards)
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(directory, fn), metadata=meta)
            for k, v in shard.items():
                weight_map[k] = fn
                total += v.numel() * v.element_size()
        with open(os.path.join(directory, _SAFE_INDEX), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32,
                        vision_tower_path: str | None = None,
                        device: str | torch.device = "cpu") -> "SaisaForCausalLM":
        """Load an exported / released directory (safetensors only).

        The vision tower comes from the main weights when present (its config from the
        nested ``vision_config``, else from the tower directory's config.json); otherwise
        from ``vision_tower_path`` or the directory named by ``mm_vision_tower`` (as given,
        or relative to ``directory``). Without either the model is text-only.
        """
        with open(os.path.join(directory, "config.json")) as fh:
            raw = json.load(fh)
        if raw.get("model_type") not in (None, "llava_llama", "llama"):
            warnings.warn(f"unexpected model_type {raw.get('model_type')!r}")
        mm = {k: raw.get(k, v) for k, v in MM_DEFAULTS.items()}
        config = LlamaConfig(**_config_kwargs(raw))
        for k, v in mm.items():
            setattr(config, k, v)
        if mm["mm_projector_type"] != "mlp2x_gelu":
            raise ValueError(f"unsupported mm_projector_type {mm['mm_projector_type']!r}")
        sd = read_safetensors_dir(directory)
        tower_in_main = any(k.startswith(TOWER_PREFIX) for k in sd)
        tower_dir = _resolve_tower_dir(vision_tower_path or mm["mm_vision_tower"], directory)
        if vision_tower_path and tower_dir is None:
            raise FileNotFoundError(f"vision tower directory {vision_tower_path!r} not found")

        vision_config = None
        if tower_in_main and raw.get("vision_config") is not None:
            vision_config = _clip_vision_config_from_dict(raw["vision_config"])
        elif tower_in_main or tower_dir is not None:
            if tower_dir is None:
                raise ValueError("tower weights present but no vision_config and no tower directory")
            with open(os.path.join(tower_dir, "config.json")) as fh:
                vision_config = _clip_vision_config_from_dict(json.load(fh))
        else:
            warnings.warn("no vision tower found (neither in the weights nor at mm_vision_tower); "
                          "the model is text-only")
        if not tower_in_main and tower_dir is not None:
            tsd = read_safetensors_dir(tower_dir)
            for k, v in tsd.items():
                if k.startswith("text_model.") or k in ("logit_scale",) or \
                        k.startswith(("text_projection", "visual_projection")):
                    continue  # parts of a full CLIPModel directory
                sd[TOWER_PREFIX + k] = v

        with_global = any(k.startswith("model.mm_projector.") for k in sd)
        with torch.device("meta"):
            model = cls(config, vision_config, with_global_projector=with_global)
        sd = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
              for k, v in sd.items()}
        if config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        res = model.load_released_state_dict(sd, strict=False, assign=True)
        missing = [k for k in res.missing_keys]
        unexpected = [k for k in res.unexpected_keys]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing={missing[:20]} unexpected={unexpected[:20]}")
        _fix_meta_buffers(model, config)
        model.to(device)
        model.eval()
        return model


# ----------------------------------------------------------------------------- builders

def build_random(llama_config_kwargs: dict, clip_config_kwargs: dict | None, seed: int = 0,
                 with_global_projector: bool = False) -> SaisaForCausalLM:
    """A small random SAISA model (float32, eval mode) for tests.

    ``llama_config_kwargs`` go to ``LlamaConfig`` (``mm_*`` keys allowed; ``mm_hidden_size``
    defaults to the CLIP hidden size); ``clip_config_kwargs`` to ``CLIPVisionConfig``
    (None: no tower). Norm weights are perturbed around 1 and the projectors get a
    non-trivial scale so that visual keys matter.
    """
    lk = dict(llama_config_kwargs)
    mm = {k: lk.pop(k) for k in list(lk) if k in MM_DEFAULTS}
    vision_config = CLIPVisionConfig(**clip_config_kwargs) if clip_config_kwargs is not None else None
    if "mm_hidden_size" not in mm:
        mm["mm_hidden_size"] = vision_config.hidden_size if vision_config is not None else 1024
    config = LlamaConfig(**lk)
    for k, v in mm.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = SaisaForCausalLM(config, vision_config, with_global_projector=with_global_projector)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(TOWER_PREFIX):
                continue  # keep HF CLIP init
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "mm_projector" in name:
                if name.endswith("weight"):
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("weight") and p.dim() == 2 and "embed_tokens" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


__all__ = [
    "IMAGE_TOKEN_INDEX",
    "SaisaForCausalLM",
    "SaisaModel",
    "SaisaVisionTower",
    "build_random",
    "make_projector",
    "read_safetensors_dir",
]
