"""saisa-import / saisa-export / saisa-logits on a tiny random released-layout SAISA
checkpoint (torch_saisa.build_random + save_pretrained), float32, <= 1e-4."""
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import torch_oracles as oracles
from saisa_jax.batch import collate, pack_sample
from saisa_jax.convert import export, hf_import, torch_saisa
from saisa_jax.models.build import build
from saisa_jax.tools import logits as logits_tool

TOL = 1e-4
LLAMA = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2)
CLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8, layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def released(tmp_path_factory, sp_tokenizer_dir):
  """(torch model, its released-layout dir with tokenizer.model, our import of it)."""
  ref = torch_saisa.build_random(LLAMA, CLIP, seed=3, with_global_projector=True).eval()
  root = tmp_path_factory.mktemp("saisa")
  src = str(root / "src")
  ref.save_pretrained(src, max_shard_size=200_000)  # several shards + index
  shutil.copy(os.path.join(sp_tokenizer_dir, "tokenizer.model"), src)
  out = str(root / "jax")
  params, config = hf_import.import_checkpoint(
      hf_import.parser().parse_args(["--checkpoint", src, "--out", out]))
  return ref, src, out, params, config


def _prompt(seed=3):
  rng = np.random.default_rng(seed)
  system, question = rng.integers(1, 31000, 6), rng.integers(1, 31000, 10)
  image = rng.normal(size=(32, 32, 3)).astype(np.float32)
  ids = np.concatenate([system, [torch_saisa.IMAGE_TOKEN_INDEX], question])[None]
  return system, question, image, torch.from_numpy(ids).long()


def test_import_matches_pytorch_and_export_round_trips(released, tmp_path):
  ref, src, out, params, config = released
  assert config.model.alignment == "saisa" and config.model.vision.select_layer == -2
  assert os.path.exists(os.path.join(out, "tokenizer", "tokenizer.model"))
  system, question, image, ids = _prompt()
  with torch.no_grad():
    want = ref(ids, oracles.pixels_nchw(image[None])).numpy()
  model, cfg = build(config.model)
  batch = collate([pack_sample([system, image, question], cfg.num_visual)], 16, 1, (32, 32))
  got = np.asarray(model.apply({"params": params}, batch))
  assert np.abs(got - want).max() <= TOL

  exported = str(tmp_path / "out_saisa")
  export.export_model(out, exported, max_shard_bytes=300_000)
  assert os.path.exists(os.path.join(exported, "model.safetensors.index.json"))
  for f in ("config.json", "generation_config.json", "tokenizer.model"):
    assert os.path.exists(os.path.join(exported, f)), f
  back = torch_saisa.SaisaForCausalLM.from_pretrained(exported)  # raises on missing keys
  with torch.no_grad():
    again = back(ids, oracles.pixels_nchw(image[None])).numpy()
  assert np.abs(again - got).max() <= TOL
  a, b = ref.released_state_dict(), back.released_state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
  # Greedy generation through the exported model works end to end.
  new = back.greedy_generate(ids, oracles.pixels_nchw(image[None]), max_new_tokens=3)
  assert new.shape == (1, 3)


def test_export_without_source_writes_identity_tower_tail(released, tmp_path):
  """Once the import source is gone, the unused tower tail is written as identity:
  the exported model still loads and its outputs are unchanged."""
  ref, src, out, params, config = released
  model_dir = str(tmp_path / "model")
  shutil.copytree(out, model_dir)
  moved = str(tmp_path / "src_moved")
  shutil.move(src, moved)
  try:
    exported = str(tmp_path / "out")
    export.export_model(model_dir, exported)
  finally:
    shutil.move(moved, src)
  back = torch_saisa.SaisaForCausalLM.from_pretrained(exported)
  assert os.path.exists(os.path.join(exported, "vision_tower", "config.json"))
  _, _, image, ids = _prompt()
  with torch.no_grad():
    want = ref(ids, oracles.pixels_nchw(image[None])).numpy()
    got = back(ids, oracles.pixels_nchw(image[None])).numpy()
  assert np.abs(got - want).max() <= TOL


def test_saisa_logits_tool_matches_pytorch(released, tmp_path):
  ref, src, out, params, config = released
  img = (np.random.default_rng(0).random((30, 44, 3)) * 255).astype(np.uint8)
  path = str(tmp_path / "img.png")
  Image.fromarray(img).save(path)
  npz = str(tmp_path / "l.npz")
  logits_tool.main(["--checkpoint", out, "--image", path, "--prompt", "What is it?",
                    "--template", "vicuna_v1", "--out", npz])
  got = np.load(npz)
  ids = got["input_ids"]
  assert (ids == torch_saisa.IMAGE_TOKEN_INDEX).sum() == 1 and ids[0, 0] == 1  # BOS first
  assert got["pixel_values"].shape == (1, 3, 32, 32)
  with torch.no_grad():
    want = ref(torch.from_numpy(ids), torch.from_numpy(got["pixel_values"])).numpy()
  assert got["logits"].shape == want.shape == (1, ids.shape[1] - 1, 32000)
  assert np.abs(got["logits"] - want).max() <= TOL


@pytest.mark.parametrize("kept", [False, True], ids=["pia", "kept_adapters"])
def test_an_eas_model_exports_and_the_pytorch_model_gives_our_logits(released, tmp_path, kept):
  """EAS (layer 1 of 3 skipped, random non-zero adapters; kept_adapters: the kept
  layers' adapters too): export -> the package's PyTorch SAISA model -> our logits
  (1e-4), with PIA's context the prompt (a system prompt, the image, a question) and an
  answer after it; saisa-import of the export gives back the skip set, the adapters
  (exactly) and the logits."""
  import flax.linen as nn
  import jax
  from saisa_jax.core.checkpoint import save_model
  from saisa_jax.models.build import dummy_batch

  _, _, out, params, config = released
  config = config.copy_and_resolve_references()
  config.model.eas = dict(enabled=True, skip=[1], width=8, groups=2, temperature=2.0,
                          scale=0.8, kept_adapters=kept, kept_width=6)
  adapters = ("pia", "kept_adapter") if kept else ("pia",)
  model, cfg = build(config.model)
  fresh = nn.meta.unbox(model.init(jax.random.key(5), dummy_batch(cfg, 1, 4, 1))["params"])
  rng = np.random.default_rng(5)
  noisy = {name: jax.tree.map(
      lambda a: np.asarray(a) + rng.normal(scale=0.2, size=a.shape).astype(np.float32),
      fresh["decoder"]["layers"][name]) for name in adapters}
  params = jax.tree.map(lambda a: a, params)
  params["decoder"]["layers"] = dict(params["decoder"]["layers"], **noisy)
  model_dir = str(tmp_path / "eas_model")
  shutil.copytree(out, model_dir)
  shutil.rmtree(os.path.join(model_dir, "params"))
  save_model(model_dir, params, config)

  exported = str(tmp_path / "eas_out")
  export.export_model(model_dir, exported)
  back = torch_saisa.SaisaForCausalLM.from_pretrained(exported)
  assert back.config.eas["skip"] == [1]
  assert hasattr(back.model.layers[0], "kept_adapter") == kept

  system, question, image, ids = _prompt()
  answer = np.array([17, 230, 4096])
  full = torch.cat([ids, torch.from_numpy(answer)[None]], dim=1)
  n_prompt = len(system) + len(question)
  with torch.no_grad():
    want = back(full, oracles.pixels_nchw(image[None]),
                prompt_lengths=torch.tensor([n_prompt])).numpy()
  batch = collate([pack_sample([system, image, question, answer], cfg.num_visual)], 24, 1, (32, 32))
  loss_mask = np.zeros(batch["tokens"].shape, np.float32)
  loss_mask[0, n_prompt - 1:n_prompt + len(answer) - 1] = 1.0
  batch["loss_mask"] = loss_mask
  got = np.asarray(model.apply({"params": params}, batch))[0, :n_prompt + len(answer)]
  assert np.abs(got - want[0]).max() <= TOL
  # The adapters and the skip matter: without them the logits move.
  plain, _ = build(dict(config.model.to_dict(), eas=None))
  stripped = dict(params, decoder=dict(params["decoder"], layers={
      k: v for k, v in params["decoder"]["layers"].items() if k not in adapters}))
  other = np.asarray(plain.apply({"params": stripped}, batch))[0, :n_prompt + len(answer)]
  assert np.abs(other - got).max() > 1e-2
  # saisa-import of the export: the same skip set and adapters, the same logits.
  again = str(tmp_path / "eas_back")
  params2, config2 = hf_import.import_checkpoint(
      hf_import.parser().parse_args(["--checkpoint", exported, "--out", again]))
  assert list(config2.model.eas.skip) == [1] and config2.model.eas.width == 8
  assert bool(config2.model.eas.get("kept_adapters")) == kept
  for name in adapters:
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params["decoder"]["layers"][name])[0],
                            jax.tree.leaves(params2["decoder"]["layers"][name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                    err_msg=name + jax.tree_util.keystr(path))
  model2, _ = build(config2.model)
  got2 = np.asarray(model2.apply({"params": params2}, batch))[0, :n_prompt + len(answer)]
  assert np.abs(got2 - got).max() <= TOL
