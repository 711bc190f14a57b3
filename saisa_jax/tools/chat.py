"""saisa-chat: talk to a model about an image.

  saisa-chat --checkpoint M --image photo.png --prompt "What is in the picture?"
  saisa-chat --checkpoint M --image photo.png          (interactive; empty line quits)

The template, tokenizer and image preprocessing come from the model's config.json.
"""
from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging
import jax

from saisa_jax import backends
from saisa_jax.data import images as images_lib
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.examples import prompt_segments
from saisa_jax.data.tokenizer import load_tokenizer
from saisa_jax.eval.generate import Generator, SamplingConfig
from saisa_jax.batch import collate, pack_sample
from saisa_jax.models.build import build
from saisa_jax.core import checkpoint as ckpt_lib

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model dir or training workdir.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file(s); repeat for several.")
_PROMPT = flags.DEFINE_string("prompt", None, "One question; without it: interactive.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings (besides EOS).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


class Chat:
  """Keeps the conversation; `ask` appends a human turn and returns the answer."""

  def __init__(self, model_dir: str, image_files: list[str], sampling: SamplingConfig,
               stop: list[str] = ()):
    self.config = ckpt_lib.load_config(model_dir)
    self.model, self.cfg = build(self.config.model)
    self.params = ckpt_lib.load_params(model_dir)
    self.generator = Generator(self.model, self.params)
    self.tok = load_tokenizer(self.config.data.tokenizer)
    self.image_size, self.num_visual = resolve_vision(self.config)
    d = self.config.data
    self.pixels = []
    for path in image_files:
      with open(path, "rb") as f:
        self.pixels.append(images_lib.load_image(
            f.read(), size=self.image_size, aspect=d.image_aspect, mean=d.image_mean,
            std=d.image_std, max_pixels=d.max_image_pixels))
    self.turns: list[dict] = []
    self.sampling, self.stop = sampling, list(stop)
    self.rng = jax.random.key(sampling.seed)

  def ask(self, text: str) -> str:
    if not self.turns and self.pixels and "<image>" not in text:
      text = "<image>\n" * len(self.pixels) + text
    self.turns.append({"from": "human", "value": text})
    template = self.config.get("template") or self.config.data.template
    segments = prompt_segments(self.turns, template, self.tok, self.pixels,
                               self.config.data.get("system_prompt"))
    sample = pack_sample(segments, self.num_visual)
    batch = collate([sample], len(sample["tokens"]), len(sample["images"]),
                    (self.image_size, self.image_size), self.tok.pad_token_id or 0)
    self.rng, key = jax.random.split(self.rng)
    ids, _ = self.generator.run_batch(batch, self.sampling.max_new_tokens, self.sampling,
                                      [self.tok.eos_token_id], key)
    out = []
    for t in ids[0].tolist():
      if t == self.tok.eos_token_id:
        break
      out.append(t)
    answer = self.tok.decode(out, skip_special_tokens=True).strip()
    for s in self.stop:
      answer = answer.split(s)[0]
    self.turns.append({"from": "gpt", "value": answer})
    return answer


def main(argv=None):
  backends.prepare_process(argv)  # first: a CPU process restarts with THP malloc (backends/cpu/hugepages.py)
  app.run(_main, argv=argv)


def _main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  if not _CHECKPOINT.value:
    sys.exit("saisa-chat: --checkpoint is required")
  chat = Chat(ckpt_lib.resolve_model_dir(_CHECKPOINT.value), _IMAGE.value,
              SamplingConfig(_MAX_NEW.value, _TEMPERATURE.value, _TOP_P.value, _SEED.value),
              _STOP.value)
  if _PROMPT.value is not None:
    print(chat.ask(_PROMPT.value))
    return
  print("saisa-chat: type a message (empty line to quit)", flush=True)
  for line in sys.stdin:
    line = line.strip()
    if not line:
      break
    print(f"ASSISTANT: {chat.ask(line)}", flush=True)


if __name__ == "__main__":
  main()
