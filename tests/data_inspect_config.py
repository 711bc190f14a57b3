"""A full-config stand-in for `saisa-data inspect` tests: `<this file>:<embedded dir>`."""
import ml_collections

from saisa_jax.data.synthetic import embedded_config


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.data = embedded_config(arg, batch_size=4)
  c.data.image_size = None  # taken from model.vision, like a real config
  c.data.num_visual = None
  c.model = ml_collections.ConfigDict({"vision": {"image_size": 32, "patch_size": 8}})
  return c
