"""Models that travel: a trained model leaves this package and comes back intact.

Two tiny models are trained once per module by saisa-train (subprocesses) on the
test-sized embedded set, with a system prompt of their own (not the template's) and their tokenizer in a folder the tests later remove:
  * saisa mode (the main job's) -> saisa-layout export, read with transformers-4 era
    loading rules (slow tokenizer class named in tokenizer_config.json, the tower's
    CLIPImageProcessor, a relative tower path) into the package's PyTorch SAISA model:
    our logits within 1e-4; export -> saisa-import -> eval: the trainer's accuracy;
  * llava mode -> hf_llava export, run by transformers' own AutoProcessor,
    LlavaForConditionalGeneration, apply_chat_template and generate, in a child process
    without mistral-common (installed here with --no-deps, it breaks AutoProcessor):
    the same answer tokens as saisa-chat.
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import small_config, write_config

SYSTEM = "The assistant answers questions."  # words the embedded tokenizer knows
QUESTIONS = 6
TOL = 1e-4


def _train(embedded, root, alignment):
  tok = os.path.join(root, "tok")
  shutil.copytree(os.path.join(embedded, "tokenizer"), tok)
  c = small_config(embedded, alignment=alignment, pretrain_steps=6, finetune_steps=24)
  c.data.tokenizer = tok
  c.data.system_prompt = SYSTEM
  c.eval.enabled = True
  c.eval.batch_size = 32
  c.train.eval_every = 12
  c.eval.periodic_items = 8
  cfg = write_config(c, os.path.join(root, "cfg.py"))
  work = os.path.join(root, "run")
  out = subprocess.run([sys.executable, "-m", "saisa_jax.train.trainer", "--config", cfg,
                        "--workdir", work], capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  acc = float(re.search(r"^held-out accuracy: ([0-9.]+)$", out.stdout, re.M).group(1))
  return {"work": work, "cfg": cfg, "tok": tok, "accuracy": acc, "config": c}


@pytest.fixture(scope="module")
def saisa_model(embedded, tmp_path_factory):
  return _train(embedded, str(tmp_path_factory.mktemp("saisa_model")), "saisa")


@pytest.fixture(scope="module")
def llava_model(embedded, tmp_path_factory):
  return _train(embedded, str(tmp_path_factory.mktemp("llava_model")), "llava")


def _questions(embedded, n=QUESTIONS):
  recs = json.load(open(os.path.join(embedded, "vqa_test.json")))[:n]
  return [(os.path.join(embedded, "images", r["image"]),
           r["conversations"][0]["value"].replace("<image>\n", "")) for r in recs]


# ------------------------------------------------------------------ the model folder

def test_the_model_folder_carries_its_tokenizer_and_loads_after_a_move(
    saisa_model, embedded, tmp_path):
  """WORKDIR/model names its tokenizer relative to itself; copied elsewhere, with the
  original tokenizer gone and another HOME, saisa-eval (same config) loads it and
  reproduces the accuracy the trainer reported, and writes the answer files."""
  model = os.path.join(saisa_model["work"], "model")
  conf = json.load(open(os.path.join(model, "config.json")))
  assert conf["data"]["tokenizer"] == "tokenizer"
  assert conf["data"]["system_prompt"] == SYSTEM
  moved = str(tmp_path / "elsewhere" / "model")
  shutil.copytree(model, moved)
  hidden = saisa_model["tok"] + ".hidden"
  os.rename(saisa_model["tok"], hidden)  # the tokenizer the model was trained with
  try:
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    ev = subprocess.run([sys.executable, "-m", "saisa_jax.eval.cli", "--config",
                         saisa_model["cfg"], "--checkpoint", moved, "--workdir",
                         str(tmp_path / "ev")], capture_output=True, text=True, env=env,
                        timeout=600)
  finally:
    os.rename(hidden, saisa_model["tok"])
  assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-2000:]
  results = json.load(open(tmp_path / "ev" / "eval" / "results.json"))
  assert round(results["embedded"]["accuracy"], 4) == saisa_model["accuracy"]
  assert results["embedded"]["num_items"] > 0 and results["embedded"]["num_skipped"] == 0
  preds = [json.loads(l) for l in open(tmp_path / "ev" / "eval" / "embedded.jsonl")]
  assert len(preds) == results["embedded"]["num_items"]
  assert os.path.exists(tmp_path / "ev" / "eval" / "embedded" / "answers.jsonl")
  run = results["run"]
  assert run["model"] == moved and run["date"].startswith("20")
  assert run["config"]["model"]["alignment"] == "saisa"


def test_training_wrote_periodic_eval_and_a_smoothed_loss(saisa_model):
  rows = [json.loads(l) for l in open(os.path.join(saisa_model["work"], "metrics.jsonl"))]
  evals = [r for r in rows if "eval/embedded/accuracy" in r]
  assert [r["step"] for r in evals] == [12, 24] and all(r["stage"] == "finetune" for r in evals)
  assert all("loss_mean" in r for r in rows if "loss" in r)
  results = json.load(open(os.path.join(saisa_model["work"], "eval", "results.json")))
  assert results["run"]["model"] == os.path.join(saisa_model["work"], "model")


# ------------------------------------------------------------------ saisa layout

def test_saisa_export_import_eval_gives_the_trainers_accuracy(saisa_model, tmp_path):
  from saisa_jax.convert import export, hf_import
  from saisa_jax.core import checkpoint as ckpt_lib
  from saisa_jax.eval.runner import evaluate

  out = str(tmp_path / "export")
  export.export_model(saisa_model["work"], out, "saisa")
  back = str(tmp_path / "back")
  hf_import.import_checkpoint(hf_import.parser().parse_args(["--checkpoint", out, "--out", back]))
  conf = ckpt_lib.load_config(back)
  assert conf.data.system_prompt == SYSTEM and conf.template == "vicuna_v1"
  conf.eval = saisa_model["config"].eval
  results = evaluate(conf, ckpt_lib.load_params(back), str(tmp_path / "eval"), model_dir=back)
  assert round(results["embedded"]["accuracy"], 4) == saisa_model["accuracy"]


def test_saisa_export_loads_by_transformers4_rules_and_gives_our_logits(saisa_model, embedded,
                                                                        tmp_path):
  import torch
  import transformers
  from PIL import Image
  from saisa_jax.convert import export, torch_saisa
  from saisa_jax.tools.logits import prefill_logits

  out = str(tmp_path / "export")
  export.export_model(saisa_model["work"], out, "saisa")
  conf = json.load(open(os.path.join(out, "config.json")))
  # The tokenizer: the class tokenizer_config.json names, one transformers 4.37 has,
  # with 4.x field types.
  tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
  assert tc["tokenizer_class"] in ("LlamaTokenizer", "LlamaTokenizerFast",
                                   "PreTrainedTokenizerFast")
  assert not isinstance(tc.get("extra_special_tokens"), list)
  tok = getattr(transformers, tc["tokenizer_class"]).from_pretrained(out)
  # The tower: a relative path, a folder a CLIPImageProcessor loads from.
  assert not os.path.isabs(conf["mm_vision_tower"])
  proc = transformers.CLIPImageProcessor.from_pretrained(os.path.join(out, conf["mm_vision_tower"]))
  model = torch_saisa.SaisaForCausalLM.from_pretrained(out)
  for image, question in _questions(embedded, 3):
    raw = open(image, "rb").read()
    ours = prefill_logits(saisa_model["work"], question, image_bytes=raw)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False)
    head, tail = prompt.split("<image>")
    ids = tok(head).input_ids + [torch_saisa.IMAGE_TOKEN_INDEX] + \
        tok(tail, add_special_tokens=False).input_ids
    assert ids == ours["input_ids"][0].tolist()  # the chat template = our prompt
    pixels = proc(images=Image.open(io.BytesIO(raw)), return_tensors="pt").pixel_values
    np.testing.assert_allclose(pixels.numpy(), ours["pixel_values"], atol=1e-5)
    with torch.no_grad():
      want = model(torch.tensor([ids]), pixels).numpy()
    assert np.abs(ours["logits"] - want).max() <= TOL


def test_a_narrow_tower_export_warns_that_the_release_cannot_load_it(saisa_model, tmp_path,
                                                                     caplog):
  from saisa_jax.convert import export
  export.export_model(saisa_model["work"], str(tmp_path / "e"), "saisa")
  assert any("1024" in r.getMessage() and "cannot load" in r.getMessage()
             for r in caplog.records)


# ------------------------------------------------------------------ one prompt

def test_logits_and_chat_build_the_same_ids(saisa_model, embedded):
  from saisa_jax.data.templates import IMAGE_ID
  from saisa_jax.eval.generate import SamplingConfig
  from saisa_jax.tools.chat import Chat
  from saisa_jax.tools.logits import prefill_logits

  image, question = _questions(embedded, 1)[0]
  chat = Chat(os.path.join(saisa_model["work"], "model"), [image], SamplingConfig(4))
  segs = chat.prompt_segments(question)
  ids = []
  for s in segs:
    ids += [IMAGE_ID] if getattr(s, "ndim", 1) == 3 else list(s)
  got = prefill_logits(saisa_model["work"], question, image_bytes=open(image, "rb").read())
  assert ids == got["input_ids"][0].tolist()
  sys_ids = chat.tok(SYSTEM, add_special_tokens=False).input_ids
  assert ids[1:1 + len(sys_ids)] == sys_ids  # the model's own system prompt, after BOS


def test_chat_is_single_turn_unless_asked_and_resets(saisa_model, embedded):
  from saisa_jax.eval.generate import SamplingConfig
  from saisa_jax.tools.chat import Chat

  image, question = _questions(embedded, 1)[0]
  chat = Chat(os.path.join(saisa_model["work"], "model"), [image], SamplingConfig(4))
  first = chat.prompt_segments(question)
  chat.ask(question)
  assert [len(s) for s in chat.prompt_segments(question)] == [len(s) for s in first]
  multi = Chat(os.path.join(saisa_model["work"], "model"), [image], SamplingConfig(4),
               multi_turn=True)
  multi.ask(question)
  assert len(multi.prompt_segments(question)[-1]) > len(first[-1])  # history kept
  multi.reset()
  assert [len(s) for s in multi.prompt_segments(question)] == [len(s) for s in first]


def test_greedy_generation_never_returns_a_padded_id(saisa_model, embedded, tmp_path):
  """The model has 128 embedding rows for a 64-token tokenizer; with the padded rows'
  lm_head pushed up they win the argmax, and still never come out."""
  import jax
  from saisa_jax.core import checkpoint as ckpt_lib
  from saisa_jax.eval.generate import SamplingConfig
  from saisa_jax.tools.chat import Chat

  src = os.path.join(saisa_model["work"], "model")
  config = ckpt_lib.load_config(src)
  params = jax.tree.map(np.asarray, ckpt_lib.load_params(src))
  vocab = config.model.llm.vocab_size
  chat = Chat(src, [_questions(embedded, 1)[0][0]], SamplingConfig(4))
  n_tok = len(chat.tok)
  assert vocab >= 2 * n_tok
  import flax.traverse_util as tu
  flat = tu.flatten_dict(params, sep="/")
  key = next(k for k in flat if "lm_head" in k)
  head = flat[key].copy()
  assert head.shape[-1] == vocab
  # The padded rows get the real rows' weights, the real rows a thousandth of them: a
  # padded id wins wherever the best token's logit is positive.
  head[:, n_tok:2 * n_tok] = head[:, :n_tok]
  head[:, :n_tok] *= 1e-3
  flat[key] = head
  params = tu.unflatten_dict(flat, sep="/")
  biased = str(tmp_path / "biased")
  ckpt_lib.save_model(biased, params, config)
  chat = Chat(biased, [_questions(embedded, 1)[0][0]], SamplingConfig(4))
  ids = chat.ask_ids(_questions(embedded, 1)[0][1])
  assert ids and all(i < n_tok for i in ids), ids
  chat.sampling = SamplingConfig(4)  # the same model without the vocabulary limit
  assert any(i >= n_tok for i in chat.ask_ids(_questions(embedded, 1)[0][1]))


# ------------------------------------------------------------------ hf_llava

HF_CHILD = r"""
import json, sys
sys.modules["mistral_common"] = None  # a PyTorch user's environment: no mistral-common
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model_dir, questions, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
proc = AutoProcessor.from_pretrained(model_dir)
model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
out = []
for image, question in questions:
  conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
  text = proc.apply_chat_template(conv, add_generation_prompt=True)
  inputs = proc(images=Image.open(image), text=text, return_tensors="pt")
  with torch.no_grad():
    ids = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
  new = ids[0, inputs["input_ids"].shape[1]:].tolist()
  out.append({"new": new, "prompt": inputs["input_ids"][0].tolist()})
print("RESULT " + json.dumps(out))
"""


def test_hf_llava_export_answers_like_saisa_chat_through_transformers_alone(
    llava_model, embedded, tmp_path):
  from saisa_jax.convert import export
  from saisa_jax.eval.generate import SamplingConfig
  from saisa_jax.tools.chat import Chat

  out = str(tmp_path / "hf")
  export.export_model(llava_model["work"], out, "hf_llava")
  conf = json.load(open(os.path.join(out, "config.json")))
  questions = _questions(embedded)
  max_new = 6
  child = subprocess.run([sys.executable, "-c", HF_CHILD, out, json.dumps(questions),
                          str(max_new)], capture_output=True, text=True, timeout=600)
  assert child.returncode == 0, child.stderr[-3000:]
  hf = json.loads(child.stdout.split("RESULT ", 1)[1])
  chat = Chat(os.path.join(llava_model["work"], "model"), [], SamplingConfig(max_new))
  eos = set(chat.eos)
  for (image, question), h in zip(questions, hf):
    chat.set_images([image])
    ours = chat.ask_ids(question)
    theirs = []
    for t in h["new"]:
      if t in eos:
        break
      theirs.append(t)
    assert theirs == ours, (question, theirs, ours)
    # One <image> id: the tokenizer's, config.json's, the processor's expansion.
    assert h["prompt"].count(conf["image_token_index"]) == conf["image_seq_length"]
