"""Data: LLaVA-format records -> fixed-shape batches in the batch.py layout.

  config.py     get_data_config(): the `config.data` section
  records.py    LLaVA JSON/JSONL sources, validation, bad-example kinds
  templates.py  plain / vicuna_v1 / llama_3, tokenised and masked as LLaVA does
  images.py     decode (any mode -> RGB), pad / resize, CLIP normalisation
  examples.py   record -> packed sample (+ targets, loss_mask), truncation
  pipeline.py   grain: shard, shuffle, map, bucket batch, workers, resumable state
  tfds_llava.py LLaVA JSON + images -> ArrayRecord, read back without TensorFlow
  shapes.py, synthetic.py  the embedded synthetic VQA set and its tokenizer
  evalset.py    held-out prompts + reference answers for exact-match eval
  cli.py        `saisa-data generate | build-tfds | inspect | bench`
"""
