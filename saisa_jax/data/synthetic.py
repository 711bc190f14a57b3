"""The embedded default data set, generated deterministically (no download).

`generate(out)` writes, in LLaVA format so it runs through the same path as real data:

  out/images/{train,test}/NNNNN.png       32x32 scenes (shapes.py)
  out/caption_{train,test}.json           pre-training pairs (template 'plain')
  out/vqa_{train,test}.json               one question per record (template 'vicuna_v1';
                                          records carry an extra "type" key)
  out/tokenizer/                          word-level tokenizer (transformers-loadable)
  out/meta.json                           sizes, seed, question counts, majority baseline
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
from PIL import Image

from saisa_jax.core.progress import Progress
from saisa_jax.data import shapes
from saisa_jax.data.config import get_data_config
from saisa_jax.data.records import write_records
from saisa_jax.data.templates import SYSTEM

CAPTION_PROMPT = "Describe the image."
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
# Words the tokenizer must know beyond the generated text: both templates' fixed parts.
_TEMPLATE_TEXT = [SYSTEM, "USER: ASSISTANT: USER: ASSISTANT:", "\n"]


def _split(out: str, split: str, n_images: int, seed: int) -> tuple[list, list]:
  """Renders one split's images; returns (caption records, vqa records)."""
  # One stream per split: the test split does not change with the train size.
  rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
  img_dir = os.path.join(out, "images", split)
  os.makedirs(img_dir, exist_ok=True)
  caps, vqa = [], []
  progress = Progress(f"rendering {split} images", n_images, unit="images", scale=1)
  for i in range(n_images):
    progress.advance(1)
    objs = shapes.sample_scene(rng)
    name = f"{split}/{i:05d}.png"
    Image.fromarray(shapes.render(objs, rng)).save(os.path.join(out, "images", name),
                                                   compress_level=1)
    caps.append({"id": f"{split}-{i:05d}-cap", "image": name, "conversations": [
        {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
        {"from": "gpt", "value": shapes.caption(objs)}]})
    for k, (qtype, q, a) in enumerate(shapes.questions(objs, rng)):
      vqa.append({"id": f"{split}-{i:05d}-q{k}", "image": name, "type": qtype,
                  "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                    {"from": "gpt", "value": a}]})
  return caps, vqa


def majority_baseline(vqa: list[dict]) -> float:
  """Exact match of always answering each type's most frequent answer."""
  by_type = collections.defaultdict(collections.Counter)
  for r in vqa:
    by_type[r["type"]][r["conversations"][1]["value"]] += 1
  return sum(c.most_common(1)[0][1] for c in by_type.values()) / max(len(vqa), 1)


def train_tokenizer(texts, out_dir: str):
  """Word-level tokenizer: words, single punctuation marks and "\\n" are tokens;
  BOS <s> is prepended like LLaMA's. Saved loadable by AutoTokenizer."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors, trainers
  from tokenizers import decoders
  import transformers

  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(" +"), behavior="removed"),
      pre_tokenizers.Split(Regex(r"[A-Za-z0-9]+|[^A-Za-z0-9 ]"), behavior="isolated"),
  ])
  tok.train_from_iterator(sorted(set(texts)), trainers.WordLevelTrainer(
      special_tokens=SPECIALS, min_frequency=1, show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
      pad_token="<pad>")
  fast.save_pretrained(out_dir)
  return fast


def generate(out: str, n_train: int = 20_000, n_test: int = 1_000, seed: int = 0) -> dict:
  """Writes the whole embedded set under `out`; returns its meta data."""
  os.makedirs(out, exist_ok=True)
  texts = list(_TEMPLATE_TEXT) + [CAPTION_PROMPT]
  meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": shapes.SIZE}
  for split, n in (("train", n_train), ("test", n_test)):
    caps, vqa = _split(out, split, n, seed)
    write_records(os.path.join(out, f"caption_{split}.json"), caps)
    write_records(os.path.join(out, f"vqa_{split}.json"), vqa)
    texts += [t["value"] for r in caps + vqa for t in r["conversations"]]
    meta[f"vqa_{split}"] = len(vqa)
    meta[f"majority_{split}"] = round(majority_baseline(vqa), 4)
    meta[f"types_{split}"] = dict(collections.Counter(r["type"] for r in vqa))
  train_tokenizer([t.replace("<image>", " ") for t in texts], os.path.join(out, "tokenizer"))
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


def embedded_config(data_dir: str, stage: str = "vqa", image_size: int = 32,
                    num_visual: int = 16, batch_size: int = 64):
  """The data section for the embedded set under `data_dir`.

  stage 'caption': caption_train.json with template 'plain' (pre-training);
  stage 'vqa': vqa_train.json with 'vicuna_v1' (instruction tuning). Samples are
  at most ~45 text tokens, so one bucket of 48 (64 is the cap) serves both.
  """
  c = get_data_config()
  c.json_path = os.path.join(data_dir, {"caption": "caption_train.json",
                                        "vqa": "vqa_train.json"}[stage])
  c.template = {"caption": "plain", "vqa": "vicuna_v1"}[stage]
  c.image_root = os.path.join(data_dir, "images")
  c.tokenizer = os.path.join(data_dir, "tokenizer")
  c.max_len, c.len_buckets = 64, (48, 64)
  c.max_images = 1
  c.image_size, c.num_visual, c.batch_size = image_size, num_visual, batch_size
  return c
