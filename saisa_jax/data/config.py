"""Defaults of the `config.data` section (ml_collections)."""
from __future__ import annotations

import ml_collections

# CLIP's normalisation, which the LLaVA-1.5 vision tower was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def get_data_config() -> ml_collections.ConfigDict:
  """The data section. Full configs set `config.data = get_data_config()`."""
  c = ml_collections.ConfigDict()

  # Where the records come from: 'json' (LLaVA JSON list or JSONL + image folder) or
  # 'tfds' (ArrayRecord written by `saisa-data build-tfds`, read without TensorFlow).
  c.source = "json"
  c.json_path = ""
  c.image_root = ""
  c.tfds_dir = ""           # the data_dir given to `build-tfds`
  c.tfds_name = "llava_records"
  c.split = "train"

  # Text: conversation template ('plain' | 'vicuna_v1' | 'llama_3') and a tokenizer
  # directory or file (tokenizer.json / tokenizer.model) loaded through transformers.
  c.template = "vicuna_v1"
  c.tokenizer = ""
  # None: the template's own system prompt; "" drops it (a cheap prompt for toy tasks).
  c.system_prompt = ml_collections.config_dict.placeholder(str)
  c.max_len = 2048          # text tokens per sample (the largest bucket)
  c.len_buckets = (256, 512, 1024, 2048)  # batch text length L is the smallest that fits
  c.max_seq_len = 0         # text + visual positions per sample; 0: no limit
  c.truncate = True         # cut over-long samples (never inside an image); else bad
  c.max_images = 1          # N: image slots per sample in the batch

  # Images: 'pad' (LLaVA's expand2square with the mean colour, then resize) or
  # 'resize' (CLIP's shortest-edge resize + centre crop, LLaVA without pad).
  c.image_aspect = "pad"
  c.image_mean = CLIP_MEAN
  c.image_std = CLIP_STD
  c.max_image_pixels = 50_000_000  # decompression-bomb guard: larger -> bad example
  # Filled from config.model.vision when None (see `resolve_vision`).
  c.image_size = ml_collections.config_dict.placeholder(int)
  c.num_visual = ml_collections.config_dict.placeholder(int)

  # Pipeline. batch_size is global; each host gets batch_size // shard_count.
  c.batch_size = 8
  c.seed = 0
  c.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
  c.shuffle = True
  c.worker_count = 0        # grain worker processes (0: in the main process)
  c.worker_buffer_size = 2  # batches each worker prepares ahead
  c.read_threads = 4        # threads decoding records within a process
  c.shard_index = -1        # -1: jax.process_index()
  c.shard_count = -1        # -1: jax.process_count()
  c.on_bad_example = "error"  # 'error' (raise, naming file/id/problem) | 'skip' (count)
  return c


def resolve_vision(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Returns (image_size, num_visual) for a full config or a bare data section.

  `config.data.image_size / num_visual` win; otherwise they come from
  `config.model.vision.image_size` and (image_size // patch_size) ** 2.
  """
  data = config.data if "data" in config else config
  size, num = data.get("image_size"), data.get("num_visual")
  vision = config.get("model", {}).get("vision", None) if "data" in config else None
  if size is None and vision is not None:
    size = vision.get("image_size")
  if num is None and vision is not None:
    num = vision.get("num_visual") or (
        (size // vision.patch_size) ** 2 if vision.get("patch_size") else None)
  if size is None or num is None:
    raise ValueError("set data.image_size and data.num_visual, or model.vision."
                     "image_size and model.vision.patch_size")
  return int(size), int(num)
