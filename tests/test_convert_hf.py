"""saisa-import / saisa-export against Hugging Face layouts (tiny random models, float32):
HF Llava <-> llava mode, an LM + a CLIP tower -> SAISA, and the streaming file I/O."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import torch_oracles as oracles
from saisa_jax.batch import collate, pack_sample
from saisa_jax.convert import export, hf_import, layout
from saisa_jax.convert.gguf_import import unpermute
from saisa_jax.convert.safetensors_io import Entry, SafetensorsDir, write_sharded
from saisa_jax.models.build import build

TOL = 1e-4


def _import(*argv):
  return hf_import.import_checkpoint(hf_import.parser().parse_args(list(argv)))


def _llava_logits(model, ids_text, image, image_id, v):
  system, question = ids_text
  ids = np.concatenate([system, np.full(v, image_id), question])[None]
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                pixel_values=oracles.pixels_nchw(image[None])).logits.numpy()[0]
  return np.concatenate([out[:len(system)], out[len(system) + v:]])


def test_hf_llava_import_export_round_trip(tmp_path):
  text_cfg = oracles.llama_hf_config(num_kv_heads=2, vocab=100)
  vis_cfg = oracles.clip_hf_config(layers=3)
  hf_cfg = transformers.LlavaConfig(vision_config=vis_cfg, text_config=text_cfg,
                                    image_token_index=99, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu")
  hf = transformers.LlavaForConditionalGeneration(hf_cfg).eval()
  oracles.randomize_(hf, seed=2)
  hf.save_pretrained(str(tmp_path / "src"))
  params, config = _import("--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "jax"))
  assert config.model.alignment == "llava"

  rng = np.random.default_rng(2)
  text = (rng.integers(1, 90, 7), rng.integers(1, 90, 9))
  image = rng.normal(size=(32, 32, 3)).astype(np.float32)
  model, cfg = build(config.model)
  batch = collate([pack_sample([text[0], image, text[1]], cfg.num_visual)], 16, 1, (32, 32))
  got = np.asarray(model.apply({"params": params}, batch))[0]
  assert np.abs(got - _llava_logits(hf, text, image, 99, cfg.num_visual)).max() <= TOL

  out = str(tmp_path / "hf_out")
  export.export_model(str(tmp_path / "jax"), out, "hf_llava")
  back, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  want = _llava_logits(back.eval(), text, image, back.config.image_token_index, cfg.num_visual)
  assert np.abs(want - got).max() <= TOL


def test_llava_export_adds_image_token_when_the_vocab_has_none(tmp_path, monkeypatch):
  """A llava-mode model from an LM + tower: the export grows the vocab by <image>.
  (Small read chunks: the embedding and lm_head go through the chunked row reader.)"""
  monkeypatch.setattr(hf_import, "CHUNK_BYTES", 1000)
  lm = transformers.LlamaForCausalLM(oracles.llama_hf_config(num_kv_heads=2)).eval()
  oracles.randomize_(lm, seed=4)
  lm.save_pretrained(str(tmp_path / "lm"))
  tower = transformers.CLIPVisionModel(oracles.clip_hf_config(layers=2)).eval()
  oracles.randomize_(tower, seed=5)
  tower.save_pretrained(str(tmp_path / "clip"))
  params, config = _import("--llm", str(tmp_path / "lm"), "--vision-tower", str(tmp_path / "clip"),
                           "--alignment", "llava", "--out", str(tmp_path / "jax"))
  out = str(tmp_path / "hf_out")
  export.export_model(str(tmp_path / "jax"), out, "hf_llava")
  back, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert back.config.image_token_index == 96 and back.config.text_config.vocab_size == 97
  rng = np.random.default_rng(4)
  text = (rng.integers(1, 90, 5), rng.integers(1, 90, 6))
  image = rng.normal(size=(32, 32, 3)).astype(np.float32)
  model, cfg = build(config.model)
  batch = collate([pack_sample([text[0], image, text[1]], cfg.num_visual)], 12, 1, (32, 32))
  got = np.asarray(model.apply({"params": params}, batch))[0]
  want = _llava_logits(back.eval(), text, image, 96, cfg.num_visual)
  assert np.abs(want[:, :96] - got[:len(want)]).max() <= TOL


def test_lm_plus_tower_import_makes_saisa_with_fresh_projectors(tmp_path):
  lm = transformers.LlamaForCausalLM(oracles.llama_hf_config(num_kv_heads=2, tie=True)).eval()
  oracles.randomize_(lm, seed=6)
  lm.tie_weights()
  lm.save_pretrained(str(tmp_path / "lm"))
  clip = transformers.CLIPVisionModel(oracles.clip_hf_config(layers=3)).eval()
  oracles.randomize_(clip, seed=7)
  clip.save_pretrained(str(tmp_path / "clip"))
  params, config = _import("--llm", str(tmp_path / "lm"), "--vision-tower", str(tmp_path / "clip"),
                           "--alignment", "saisa", "--out", str(tmp_path / "jax"))
  assert list(config.imported.fresh) == ["projector"]
  assert params["decoder"]["layers"]["projector"]["fc1"]["kernel"].shape == (2, 48, 64)
  # The LLM and the tower are the sources' tensors.
  sd = lm.state_dict()
  np.testing.assert_array_equal(np.asarray(params["decoder"]["embedding"]["embedding"]),
                                sd["model.embed_tokens.weight"].numpy())
  np.testing.assert_array_equal(np.asarray(params["decoder"]["layers"]["down_proj"]["kernel"][1]),
                                sd["model.layers.1.mlp.down_proj.weight"].numpy().T)
  csd = clip.state_dict()
  key = next(k for k in csd if k.endswith("encoder.layers.1.mlp.fc1.bias"))
  np.testing.assert_array_equal(np.asarray(params["vision"]["layers"]["fc1"]["bias"][1]),
                                csd[key].numpy())
  # The exported SAISA checkpoint holds its tower, named relative to it (it travels
  # whole); with --tower-dir auto it references the tower directory it came from.
  out = str(tmp_path / "saisa_out")
  export.export_model(str(tmp_path / "jax"), out)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["mm_vision_tower"] == "vision_tower"
  assert os.path.exists(os.path.join(out, "vision_tower", "preprocessor_config.json"))
  export.export_model(str(tmp_path / "jax"), out + "_auto", tower_dir="auto")
  with open(os.path.join(out + "_auto", "config.json")) as f:
    assert json.load(f)["mm_vision_tower"] == str(tmp_path / "clip")


def test_streamed_safetensors_bf16_shards_and_row_reads(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 5)).astype(np.float32)
  b = rng.normal(size=(7,)).astype(np.float32)
  write_sharded(str(tmp_path), [Entry("a", a.shape, lambda: a, "BF16"),
                                Entry("b", b.shape, lambda: b)], max_shard_bytes=40)
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  src = SafetensorsDir(str(tmp_path))
  want = torch.from_numpy(a).to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(src.read("a"), want)
  np.testing.assert_array_equal(src.read("a", slice(2, 4)), want[2:4])
  np.testing.assert_array_equal(src.read("b"), b)
  from safetensors.torch import load_file  # the reference reader agrees
  np.testing.assert_array_equal(
      load_file(str(tmp_path / "model-00001-of-00002.safetensors"))["a"].float().numpy(), want)


def test_gguf_unpermute_inverts_llama_cpp_permute():
  heads, hd, d = 3, 8, 5
  w = np.arange(heads * hd * d, dtype=np.float32).reshape(heads * hd, d)
  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
  permuted = w.reshape(heads, 2, hd // 2, d).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(unpermute(permuted, heads), w)


def test_canonical_names_unify_checkpoint_generations():
  c = layout.canonical_name
  assert c("language_model.model.layers.0.mlp.up_proj.weight") == \
      c("model.language_model.layers.0.mlp.up_proj.weight")
  assert c("vision_tower.vision_model.embeddings.class_embedding") == \
      c("model.vision_tower.embeddings.class_embedding")
  assert c("model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight") == \
      "model.vision_tower.vision_tower.pre_layrnorm.weight"
