"""Tests of the independent PyTorch SAISA reference (saisa_jax/convert/torch_saisa.py)."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from saisa_jax.convert.torch_saisa import (  # noqa: E402
    IMAGE_TOKEN_INDEX,
    SaisaForCausalLM,
    build_random,
)

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=128, max_position_embeddings=256,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
CLIP = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4)
V = (32 // 8) ** 2  # visual tokens per image
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(4, torch.get_num_threads()))
    return build_random(LLAMA, CLIP, seed=0)


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, LLAMA["vocab_size"], (n,), generator=g)


def _img(seed, n=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _row(a, b):
    return torch.cat([a, torch.tensor([IMAGE_TOKEN_INDEX]), b])[None]


def _hf_llama(model):
    cfg = transformers.LlamaConfig(**LLAMA)
    cfg._attn_implementation = "eager"
    ref = LlamaForCausalLM(cfg).eval()
    sd = {k: v for k, v in model.state_dict().items()
          if "mm_projector" not in k and "vision_tower" not in k}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ref


@torch.no_grad()
def test_state_dict_names(model):
    names = set(model.released_state_dict())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "model.norm.weight" in names
    for l in range(LLAMA["num_hidden_layers"]):
        for p in ("q", "k", "v", "o"):
            assert f"model.layers.{l}.self_attn.{p}_proj.weight" in names
        for p in ("gate", "up", "down"):
            assert f"model.layers.{l}.mlp.{p}_proj.weight" in names
        for p in ("input", "post_attention"):
            assert f"model.layers.{l}.{p}_layernorm.weight" in names
        for i in ("0", "2"):
            for w in ("weight", "bias"):
                assert f"model.layers.{l}.mm_projector.{i}.{w}" in names
    tower = [n for n in names if n.startswith("model.vision_tower.vision_tower.")]
    assert tower and all(n.startswith("model.vision_tower.vision_tower.vision_model.") for n in tower)
    other = names - set(tower)
    assert all(n.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head"))
               for n in other), other


@torch.no_grad()
def test_text_only_matches_hf_llama(model):
    ref = _hf_llama(model)
    ids = _ids(12, 1)[None]
    out = model(ids)
    assert out.shape == (1, 12, LLAMA["vocab_size"])
    exp = ref(input_ids=ids).logits
    torch.testing.assert_close(out, exp, atol=ATOL, rtol=0)
    # also with pixel_values given but no placeholder (ignored)
    torch.testing.assert_close(model(ids, _img(0)), exp, atol=ATOL, rtol=0)


@torch.no_grad()
def test_text_before_image_unaffected(model):
    a, b = _ids(5, 2), _ids(6, 3)
    ids = _row(a, b)
    l1, l2 = model(ids, _img(10)), model(ids, _img(11))
    assert l1.shape == (1, 11, LLAMA["vocab_size"])
    torch.testing.assert_close(l1[:, :5], l2[:, :5], atol=0, rtol=0)
    # and equals the text-only prefix
    torch.testing.assert_close(l1[:, :5], model(a[None]), atol=ATOL, rtol=0)


@torch.no_grad()
def test_text_after_image_depends_on_image(model):
    ids = _row(_ids(5, 2), _ids(6, 3))
    l1, l2 = model(ids, _img(10)), model(ids, _img(11))
    diff = (l1[:, 5:] - l2[:, 5:]).abs().amax(-1)
    assert bool((diff > 1e-3).all()), diff


def _hf_with_visual_cache(model, ref, a, b, pix):
    """SAISA semantics built from HF LLaMA: prefill text A, append per-layer visual K/V
    (P_l -> input_layernorm -> k/v_proj, RoPE at s..s+V-1) to the cache, then run text B
    at positions s+V.. ."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    s = a.shape[0]
    cache = DynamicCache(config=ref.config)
    out_a = ref(input_ids=a[None], past_key_values=cache, use_cache=True)
    feats = model.encode_images(pix)
    vpos = (s + torch.arange(V))[None]
    cos, sin = ref.model.rotary_emb(feats, vpos)
    for l, layer in enumerate(model.model.layers):
        h = layer.input_layernorm(layer.mm_projector(feats))
        hd = layer.self_attn.head_dim
        k = layer.self_attn.k_proj(h).view(1, V, -1, hd).transpose(1, 2)
        v = layer.self_attn.v_proj(h).view(1, V, -1, hd).transpose(1, 2)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cache.update(k, v, l)
    pos_b = (s + V + torch.arange(b.shape[0]))[None]
    out_b = ref(input_ids=b[None], past_key_values=cache, position_ids=pos_b, use_cache=True,
                attention_mask=torch.ones(1, s + V + b.shape[0], dtype=torch.long))
    return torch.cat([out_a.logits, out_b.logits], dim=1)


@torch.no_grad()
def test_matches_hf_llama_with_visual_kv_cache(model):
    """Positions (s..s+V-1 for the image, s+V.. after it) and the mask, checked against HF."""
    ref = _hf_llama(model)
    a, b = _ids(3, 4), _ids(4, 5)
    pix = _img(12)
    got = model(_row(a, b), pix)
    exp = _hf_with_visual_cache(model, ref, a, b, pix)
    torch.testing.assert_close(got, exp, atol=ATOL, rtol=0)


@torch.no_grad()
def test_batch_equals_rows(model):
    vocab = LLAMA["vocab_size"]
    r0 = _row(_ids(2, 5), _ids(7, 6))      # image at 2, length 10
    r1 = _row(_ids(6, 7), _ids(1, 8))      # image at 6, length 8 (padded)
    r2 = _ids(5, 9)[None]                  # text-only, length 5 (padded)
    T = 10
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate((r0, r1, r2)):
        ids[i, : r.shape[1]] = r[0]
        mask[i, : r.shape[1]] = 1
    pix = torch.cat([_img(20), _img(21), _img(22)])
    out, tmask = model(ids, pix, attention_mask=mask, return_text_mask=True)
    assert out.shape == (3, T, vocab)  # a text-only row present -> T_out = T
    assert tmask.sum(1).tolist() == [9, 7, 5]
    torch.testing.assert_close(out[0, :9], model(r0, _img(20))[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :7], model(r1, _img(21))[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2, :5], model(r2)[0], atol=ATOL, rtol=0)
    assert bool((out[~tmask] == 0).all())
    # images given only for image rows
    out2 = model(ids, torch.cat([_img(20), _img(21)]), attention_mask=mask)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    # all rows with images -> T_out = T - 1
    both = torch.cat([r0, _row(_ids(4, 10), _ids(5, 11))])
    out3 = model(both, torch.cat([_img(20), _img(23)]))
    assert out3.shape == (2, 9, vocab)
    torch.testing.assert_close(out3[0], out[0, :9], atol=ATOL, rtol=0)


@torch.no_grad()
def test_vision_features(model):
    pix = _img(30, n=2)
    tower = model.model.vision_tower.vision_tower
    exp = tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = model.encode_images(pix)
    assert got.dtype == torch.float32 and got.shape == (2, V, CLIP["hidden_size"])
    torch.testing.assert_close(got, exp, atol=0, rtol=0)


@torch.no_grad()
def test_save_load_roundtrip(model, tmp_path):
    d = str(tmp_path / "exp")
    model.save_pretrained(d, max_shard_size=60_000)  # force sharding
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["model_type"] == "llava_llama" and cfg["mm_hidden_size"] == CLIP["hidden_size"]
    assert cfg["mm_vision_select_feature"] == "patch" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert cfg["vision_config"]["image_size"] == 32
    loaded = SaisaForCausalLM.from_pretrained(d)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = _row(_ids(4, 40), _ids(5, 41))
    torch.testing.assert_close(loaded(ids, _img(42)), model(ids, _img(42)), atol=0, rtol=0)


@torch.no_grad()
def test_separate_tower_dir(model, tmp_path):
    """Release layout: tower not in the main weights, loaded from mm_vision_tower."""
    tower_dir = str(tmp_path / "clip")
    model.model.vision_tower.vision_tower.save_pretrained(tower_dir)  # HF's own format
    d = str(tmp_path / "main")
    model.config.mm_vision_tower = tower_dir
    try:
        model.save_pretrained(d, include_vision_tower=False)
    finally:
        model.config.mm_vision_tower = None
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert "vision_config" not in cfg
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        assert not any("vision_tower" in k for k in f.keys())
    loaded = SaisaForCausalLM.from_pretrained(d)
    ids = _row(_ids(3, 50), _ids(5, 51))
    torch.testing.assert_close(loaded(ids, _img(52)), model(ids, _img(52)), atol=0, rtol=0)

    # A full-CLIPModel style directory (hub spelling: vision_model.* plus text weights).
    from safetensors.torch import save_file
    hub_dir = str(tmp_path / "clip_hub")
    os.makedirs(hub_dir)
    tsd = {("vision_model." + k if not k.startswith("vision_model.") else k): v.contiguous()
           for k, v in model.model.vision_tower.vision_tower.state_dict().items()}
    tsd["vision_model.embeddings.position_ids"] = torch.arange(V + 1)[None]
    tsd["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    tsd["logit_scale"] = torch.zeros(())
    save_file(tsd, os.path.join(hub_dir, "model.safetensors"))
    vc = model.vision_config.to_dict()
    json.dump({"model_type": "clip", "vision_config": vc, "text_config": {}},
              open(os.path.join(hub_dir, "config.json"), "w"))
    loaded2 = SaisaForCausalLM.from_pretrained(d, vision_tower_path=hub_dir)
    torch.testing.assert_close(loaded2(ids, _img(52)), model(ids, _img(52)), atol=0, rtol=0)


@torch.no_grad()
def test_gqa_and_llama3_rope():
    cfg = dict(LLAMA, num_key_value_heads=2, num_hidden_layers=3, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    m = build_random(cfg, CLIP, seed=3)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)
    a, b = _ids(5, 60), _ids(4, 61)
    # text-only equals HF LLaMA with the same (GQA, llama3-rope) config
    hcfg = transformers.LlamaConfig(**cfg)
    hcfg._attn_implementation = "eager"
    ref = LlamaForCausalLM(hcfg).eval()
    sd = {k: v for k, v in m.state_dict().items() if "mm_projector" not in k and "vision_tower" not in k}
    ref.load_state_dict(sd, strict=False)
    ids = torch.cat([a, b])[None]
    torch.testing.assert_close(m(ids), ref(input_ids=ids).logits, atol=ATOL, rtol=0)
    l1 = m(_row(a, b), _img(62))
    torch.testing.assert_close(l1, _hf_with_visual_cache(m, ref, a, b, _img(62)), atol=ATOL, rtol=0)
    l2 = m(_row(a, b), _img(63))
    torch.testing.assert_close(l1[:, :5], l2[:, :5], atol=0, rtol=0)
    assert bool(((l1[:, 5:] - l2[:, 5:]).abs().amax(-1) > 1e-3).all())


@torch.no_grad()
def test_tied_embeddings_and_global_projector(tmp_path):
    m = build_random(dict(LLAMA, tie_word_embeddings=True), CLIP, seed=4, with_global_projector=True)
    names = set(m.released_state_dict())
    assert "lm_head.weight" not in names and "model.mm_projector.0.weight" in names
    d = str(tmp_path / "tied")
    m.save_pretrained(d)
    loaded = SaisaForCausalLM.from_pretrained(d)
    assert loaded.model.mm_projector is not None and loaded.lm_head is None
    ids = _row(_ids(3, 70), _ids(3, 71))
    torch.testing.assert_close(loaded(ids, _img(72)), m(ids, _img(72)), atol=0, rtol=0)


@torch.no_grad()
def test_greedy_generate(model):
    ids = _row(_ids(4, 80), _ids(3, 81))
    pix = _img(82)
    out = model.greedy_generate(ids, pix, max_new_tokens=4)
    assert out.shape == (1, 4)
    # step-by-step consistency with forward
    seq = ids
    for t in range(4):
        nxt = model(seq, pix)[0, -1].argmax()
        assert int(nxt) == int(out[0, t])
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    eos = int(out[0, 1])
    n = 1 if int(out[0, 0]) == eos else 2
    out2 = model.greedy_generate(ids, pix, max_new_tokens=4, eos_token_id=eos)
    torch.testing.assert_close(out2, out[:, :n], atol=0, rtol=0)
