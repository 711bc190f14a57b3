"""The embedded set: deterministic, image-dependent, LLaVA-format, with its tokenizer."""
import collections
import filecmp
import json
import os

import numpy as np
from PIL import Image

from saisa_jax.batch import pack_sample
from saisa_jax.data import shapes, synthetic
from saisa_jax.data.synthetic import embedded_config
from saisa_jax.data.evalset import eval_examples, normalise_answer
from saisa_jax.data.templates import SYSTEM
from saisa_jax.data.tokenizer import load_tokenizer


def test_generation_is_deterministic(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  synthetic.generate(str(a), n_train=15, n_test=5, seed=3)
  synthetic.generate(str(b), n_train=15, n_test=5, seed=3)
  for name in ["vqa_train.json", "caption_test.json", "images/train/00007.png",
               "images/test/00004.png", "tokenizer/tokenizer.json"]:
    assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_llava_format_files(embedded):
  meta = json.load(open(os.path.join(embedded, "meta.json")))
  vqa = json.load(open(os.path.join(embedded, "vqa_train.json")))
  caps = json.load(open(os.path.join(embedded, "caption_train.json")))
  assert len(caps) == 120 and len(vqa) == meta["vqa_train"]
  assert 5 <= len(vqa) / 120 <= 7  # ~6 questions per image (121k for 20k)
  assert set(r["type"] for r in vqa) == set(shapes.QUESTION_TYPES)
  for r in vqa[:50] + caps[:50]:
    assert r["conversations"][0]["value"].startswith("<image>\n")
    img = Image.open(os.path.join(embedded, "images", r["image"]))
    assert img.size == (32, 32) and img.mode == "RGB"
  assert all(len(r["conversations"][1]["value"].split()) == 1 for r in vqa)


def test_scenes_follow_the_task():
  rng = np.random.default_rng(0)
  for _ in range(300):
    objs = shapes.sample_scene(rng)
    assert 1 <= len(objs) <= 3
    for o in objs:
      assert 9 <= o["size"] <= 13 and o["shape"] in shapes.SHAPES
    for i, o in enumerate(objs):  # boxes apart, listed left to right
      for p in objs[i + 1:]:
        assert (o["x"] + o["size"] <= p["x"] or p["x"] + p["size"] <= o["x"] or
                o["y"] + o["size"] <= p["y"] or p["y"] + p["size"] <= o["y"])
        assert o["x"] + o["size"] / 2 < p["x"] + p["size"] / 2
    cap = shapes.caption(objs)
    assert [w for w in cap.replace(",", "").replace(".", "").split()
            if w in shapes.SHAPES] == [o["shape"] for o in objs]


def test_questions_need_the_image():
  rng = np.random.default_rng(1)
  qa = [q for _ in range(3000) for q in shapes.questions(shapes.sample_scene(rng), rng)]
  by_type = collections.defaultdict(collections.Counter)
  by_text = collections.defaultdict(collections.Counter)
  for t, q, a in qa:
    by_type[t][a] += 1
    by_text[q][a] += 1
  blind = lambda groups: sum(c.most_common(1)[0][1] for c in groups.values()) / len(qa)
  assert 0.33 < blind(by_type) < 0.42  # the per-type majority answer (~39%)
  assert blind(by_text) < 0.45         # knowing the exact question text barely helps
  yes = by_type["exists"]
  assert abs(yes["yes"] - yes["no"]) < 0.06 * sum(yes.values())  # balanced


def test_tokenizer_ships_and_covers_the_text(embedded):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(os.path.join(embedded, "tokenizer"))
  assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
  texts = [SYSTEM + " USER: ASSISTANT:</s>\n"]
  for name in ["vqa_train.json", "caption_train.json", "vqa_test.json"]:
    texts += [t["value"].replace("<image>", "")
              for r in json.load(open(os.path.join(embedded, name)))
              for t in r["conversations"]]
  for text in texts:
    ids = tok(text).input_ids
    assert ids[0] == 1 and 0 not in ids, text
  assert tok.decode(tok("a red square, a blue circle.").input_ids,
                    skip_special_tokens=True) == "a red square, a blue circle."


def test_eval_examples(embedded):
  c = embedded_config(embedded)
  exs = eval_examples(c, os.path.join(embedded, "vqa_test.json"))
  assert len(exs) == json.load(open(os.path.join(embedded, "meta.json")))["vqa_test"]
  tok = load_tokenizer(c.tokenizer)
  tail = tok.convert_tokens_to_ids(["?", "ASSISTANT", ":"])
  for e in exs[:20]:
    seg = e["segments"]
    assert isinstance(seg[1], np.ndarray) and seg[1].shape == (32, 32, 3)
    assert list(seg[-1][-3:]) == tail and e["answer"] == normalise_answer(e["answer"])
    s = pack_sample(seg, num_visual=16)
    assert s["image_slots"].tolist() == [len(seg[0])]
  assert normalise_answer(" Red.</s>") == "red"
