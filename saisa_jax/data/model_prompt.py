"""The one prompt builder: how a model's config turns a conversation into ids.

Every place that asks a trained or imported model something builds its prompt here,
so they agree token for token: saisa-chat, saisa-logits, eval (runner.item_prompt),
and the exports' chat templates (`chat_template_jinja`, rendered by transformers'
apply_chat_template to the same text).

What a model's config.json says about its prompt:
  template               (import) or data.template (training): 'vicuna_v1', 'chatml', ...
  data.system_prompt     None: the template's own; "": none; else that text
  data.image_*           preprocessing (aspect, mean, std, max pixels)
"""
from __future__ import annotations

from saisa_jax.data import images as images_lib
from saisa_jax.data.config import CLIP_MEAN, CLIP_STD
from saisa_jax.data.examples import split_segments
from saisa_jax.data.records import IMAGE_TOKEN
from saisa_jax.data.templates import (Template, for_tokenizer, get_template, prompt_ids,
                                      tokenizer_image_token)


def template_name(config, override: str | None = None) -> str:
  """The model's template: `override`, else config.template, else data.template."""
  data = config.get("data", {}) or {}
  return override or config.get("template") or data.get("template") or "vicuna_v1"


def system_prompt(config) -> str | None:
  return (config.get("data", {}) or {}).get("system_prompt")


def model_template(config, tokenizer, override: str | None = None) -> Template:
  """The Template the model was trained with: its system prompt, its end of turn."""
  return for_tokenizer(get_template(template_name(config, override), system_prompt(config)),
                       tokenizer)


def stop_ids(config, tokenizer) -> list[int]:
  """Ids that end an answer: the tokenizer's EOS and the template's end of turn
  (ChatML's <|im_end|>, LLaMA-3's <|end_of_text|>) where the tokenizer has them."""
  t = model_template(config, tokenizer)
  out = [tokenizer.eos_token_id]
  for tok in (t.sep2, "<|end_of_text|>", "<|im_end|>"):
    i = tokenizer.convert_tokens_to_ids(tok) if tok else None
    if isinstance(i, int) and i != tokenizer.unk_token_id:
      out.append(i)
  return sorted({i for i in out if i is not None})


def load_pixels(config, image_bytes: bytes, image_size: int):
  """Encoded image -> float32[H, W, 3], preprocessed as the model was trained."""
  d = config.get("data", {}) or {}
  return images_lib.load_image(
      image_bytes, size=image_size, aspect=d.get("image_aspect", "pad"),
      mean=tuple(d.get("image_mean", CLIP_MEAN)),
      std=tuple(d.get("image_std", CLIP_STD)),
      max_pixels=int(d.get("max_image_pixels", 50_000_000)))


def generation_ids(config, tokenizer, conversations: list[dict], num_images: int,
                   template: str | None = None) -> list[int]:
  """Ids of the generation prompt (IMAGE_ID where each image goes), ending with the
  open assistant turn. `conversations`: LLaVA turns ending with a human turn."""
  name = template_name(config, template)
  if name == "plain":  # pre-training layout: the images, then the text
    text = conversations[-1]["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
    return tokenizer_image_token(IMAGE_TOKEN * num_images + text, tokenizer)
  return prompt_ids(conversations, name, tokenizer, num_images, system_prompt(config))


def generation_segments(config, tokenizer, conversations: list[dict], pixels: list,
                        template: str | None = None) -> list:
  """generation_ids split into text and image segments (batch.pack_sample's input)."""
  return split_segments(generation_ids(config, tokenizer, conversations, len(pixels),
                                       template), pixels)


def with_images(text: str, num_images: int) -> str:
  """A first human turn: "<image>\\n" per image unless the text places them itself."""
  if num_images and IMAGE_TOKEN not in text:
    return IMAGE_TOKEN + "\n" + text if num_images == 1 else \
        "".join(IMAGE_TOKEN + "\n" for _ in range(num_images)) + text
  return text


# --------------------------------------------------------------------------- exports

def _jinja_str(s: str) -> str:
  return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template_jinja(config, tokenizer) -> str:
  """A Jinja chat template that renders, for transformers' apply_chat_template, the
  text `generation_ids` tokenises (messages with role user / assistant / system;
  content a string or a list of {"type": "image"} and {"type": "text"} parts; images
  go first in their message, as LLaVA places them).

  A leading system message replaces the model's system prompt."""
  t = model_template(config, tokenizer)
  if t.style == "plain":
    return ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            f"{IMAGE_TOKEN}{{% endif %}}{{% endfor %}}{{% for c in m['content'] %}}"
            "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
            "{% endif %}{% endfor %}")
  # The message's text with its images first: "<image>\n" * n + text, as
  # templates.move_image_to_front writes a one-image turn.
  content = (
      "{% if m['content'] is string %}{% set text = m['content'] %}{% set n = 0 %}"
      "{% else %}{% set ns = namespace(text='', n=0) %}{% for c in m['content'] %}"
      "{% if c['type'] == 'image' %}{% set ns.n = ns.n + 1 %}"
      "{% elif c['type'] == 'text' %}{% set ns.text = ns.text + c['text'] %}{% endif %}"
      "{% endfor %}{% set text = ns.text %}{% set n = ns.n %}{% endif %}"
      f"{{% set body = ({_jinja_str(IMAGE_TOKEN + chr(10))} * n + text|trim) if n == 1 "
      f"else ({_jinja_str(IMAGE_TOKEN + chr(10))} * n + text) %}}")
  if t.style == "chatml":
    return (
        "{% set ns0 = namespace(sys=" + _jinja_str(t.system) + ") %}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set ns0.sys = messages[0]['content'] %}{% set messages = messages[1:] %}{% endif %}"
        "{% if ns0.sys %}{{ '<|im_start|>system\\n' + ns0.sys + '<|im_end|>\\n' }}{% endif %}"
        "{% for m in messages %}" + content +
        "{{ '<|im_start|>' + m['role'] + '\\n' + body + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
  user, assistant = t.roles
  return (
      "{% set ns0 = namespace(sys=" + _jinja_str(t.system) + ") %}"
      "{% if messages and messages[0]['role'] == 'system' %}"
      "{% set ns0.sys = messages[0]['content'] %}{% set messages = messages[1:] %}{% endif %}"
      "{% if ns0.sys %}{{ ns0.sys + " + _jinja_str(t.sep) + " }}{% endif %}"
      "{% for m in messages %}" + content +
      "{% if m['role'] == 'user' %}{{ " + _jinja_str(user + ": ") + " + body + "
      + _jinja_str(t.sep) + " }}"
      "{% else %}{{ " + _jinja_str(assistant + ": ") + " + body + " + _jinja_str(t.sep2)
      + " }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}{{ " + _jinja_str(assistant + ":") + " }}{% endif %}")
