"""saisa-chat: talk to a model about an image.

  saisa-chat --checkpoint M --image photo.png --prompt "What is in the picture?"
  saisa-chat --checkpoint M --image photo.png          (interactive; empty line quits)

Interactive mode asks one question at a time about the image (each question a fresh
conversation, as the model was trained); --multi_turn keeps the history, and the
command /reset starts over. The template, system prompt, tokenizer and image
preprocessing come from the model's config.json (data/model_prompt.py builds the
prompt, as saisa-logits and eval do).
"""
from __future__ import annotations

import dataclasses
import sys

from absl import app, flags
from absl import logging as absl_logging
import jax

from saisa_jax import backends
from saisa_jax.batch import collate, pack_sample
from saisa_jax.core import checkpoint as ckpt_lib, cli
from saisa_jax.data.config import resolve_vision
from saisa_jax.data.model_prompt import generation_segments, load_pixels, stop_ids, with_images
from saisa_jax.data.tokenizer import load_tokenizer
from saisa_jax.eval.generate import Generator, SamplingConfig
from saisa_jax.models.build import build

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model dir or training workdir.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file(s); repeat for several.")
_PROMPT = flags.DEFINE_string("prompt", None, "One question; without it: interactive.")
_MULTI = flags.DEFINE_bool("multi_turn", False, "Interactive: keep the conversation "
                           "(default: every question is asked afresh). /reset clears it.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings (besides EOS).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

RESET = "/reset"
MARKER = "> "


class Chat:
  """One model and its images; `ask` adds a human turn and returns the answer.

  multi_turn=False: every `ask` is a fresh conversation about the images."""

  def __init__(self, model_dir: str, image_files: list[str], sampling: SamplingConfig,
               stop: list[str] = (), multi_turn: bool = False):
    self.config = ckpt_lib.load_config(model_dir)
    self.model, self.cfg = build(self.config.model)
    self.params = ckpt_lib.load_params(model_dir)
    self.generator = Generator(self.model, self.params)
    self.tok = load_tokenizer(self.config.data.tokenizer)
    self.image_size, self.num_visual = resolve_vision(self.config)
    self.set_images(image_files)
    self.multi_turn = multi_turn
    # Padded embedding rows are never answered (they decode to nothing).
    self.sampling = dataclasses.replace(sampling, vocab_size=len(self.tok))
    self.stop = list(stop)
    self.eos = stop_ids(self.config, self.tok)
    self.rng = jax.random.key(sampling.seed)

  def reset(self) -> None:
    self.turns = []

  def set_images(self, image_files: list[str]) -> None:
    """A new conversation about these images."""
    self.pixels = []
    for path in image_files:
      with open(path, "rb") as f:
        self.pixels.append(load_pixels(self.config, f.read(), self.image_size))
    self.reset()

  def prompt_segments(self, text: str) -> list:
    if not self.multi_turn:
      self.reset()
    if not self.turns:
      text = with_images(text, len(self.pixels))
    self.turns.append({"from": "human", "value": text})
    return generation_segments(self.config, self.tok, self.turns, self.pixels)

  def ask_ids(self, text: str) -> list[int]:
    """The answer's token ids (up to the first end of turn)."""
    sample = pack_sample(self.prompt_segments(text), self.num_visual)
    batch = collate([sample], len(sample["tokens"]), len(sample["images"]),
                    (self.image_size, self.image_size), self.tok.pad_token_id or 0)
    self.rng, key = jax.random.split(self.rng)
    ids, _ = self.generator.run_batch(batch, self.sampling.max_new_tokens, self.sampling,
                                      self.eos, key)
    out = []
    for t in ids[0].tolist():
      if t in self.eos:
        break
      out.append(t)
    return out

  def ask(self, text: str) -> str:
    answer = self.tok.decode(self.ask_ids(text), skip_special_tokens=True).strip()
    for s in self.stop:
      answer = answer.split(s)[0]
    self.turns.append({"from": "gpt", "value": answer})
    return answer


def main(argv=None):
  backends.prepare_process(argv)  # first: a CPU process restarts with THP malloc (backends/cpu/hugepages.py)
  cli.set_help(__name__)
  app.run(cli.one_line("saisa-chat", _main), argv=argv)


def _main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax / jax INFO chatter
  if not _CHECKPOINT.value:
    sys.exit("saisa-chat: --checkpoint is required (a model directory or training workdir)")
  for path in _IMAGE.value:
    cli.require_file(path, "--image")
  chat = Chat(ckpt_lib.resolve_model_dir(_CHECKPOINT.value), _IMAGE.value,
              SamplingConfig(_MAX_NEW.value, _TEMPERATURE.value, _TOP_P.value, _SEED.value),
              _STOP.value, multi_turn=_MULTI.value)
  if _PROMPT.value is not None:
    print(chat.ask(_PROMPT.value))
    return
  mode = "one conversation, /reset to start over" if chat.multi_turn else \
      "each question asked afresh; --multi_turn keeps the history"
  print(f"saisa-chat: type a question ({mode}; empty line quits)", flush=True)
  while True:
    print(MARKER, end="", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
      break
    if line.strip() == RESET:
      chat.reset()
      print("(conversation cleared)", flush=True)
      continue
    print(chat.ask(line.strip()), flush=True)


if __name__ == "__main__":
  main()
