"""The embedded task's scenes and their questions (pure functions of a numpy Generator).

A scene: 32x32 RGB, dark background, 1-3 non-overlapping shapes (square, circle,
triangle; 9-13 px; red, green, blue, yellow), light noise. Seven question types with
one-word answers; none can be answered without the image (the majority answer per
type scores ~39% overall).
"""
from __future__ import annotations

import numpy as np

SIZE = 32
SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (45, 180, 70), "blue": (55, 90, 225),
           "yellow": (225, 205, 45)}
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("colour_of_shape", "shape_of_colour", "count_all", "count_shape",
                  "exists", "leftmost_shape", "rightmost_colour")


def _mask(shape: str, s: int) -> np.ndarray:
  """bool[s, s] footprint of a shape in its box."""
  yy, xx = np.mgrid[:s, :s] + 0.5
  c = s / 2
  if shape == "square":
    return np.ones((s, s), bool)
  if shape == "circle":
    return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
  return np.abs(xx - c) <= yy / 2  # triangle: apex on top, base at the bottom


def sample_scene(rng: np.random.Generator) -> list[dict]:
  """1-3 objects {shape, colour, x, y, size}; boxes apart, centres >= 3 px apart in x
  (so "leftmost" / "rightmost" are unambiguous)."""
  n = int(rng.integers(1, 4))
  while True:
    objs = []
    for _ in range(200):
      s = int(rng.integers(9, 14))
      x, y = int(rng.integers(0, SIZE - s + 1)), int(rng.integers(0, SIZE - s + 1))
      ok = all(x + s + 1 <= o["x"] or o["x"] + o["size"] + 1 <= x or
               y + s + 1 <= o["y"] or o["y"] + o["size"] + 1 <= y for o in objs)
      ok = ok and all(abs((x + s / 2) - (o["x"] + o["size"] / 2)) >= 3 for o in objs)
      if ok:
        objs.append({"shape": SHAPES[rng.integers(3)],
                     "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                     "x": x, "y": y, "size": s})
        if len(objs) == n:
          return sorted(objs, key=lambda o: o["x"] + o["size"] / 2)  # left to right


def render(objs: list[dict], rng: np.random.Generator) -> np.ndarray:
  """uint8[32, 32, 3]."""
  img = np.empty((SIZE, SIZE, 3), np.float32)
  img[:] = rng.uniform(15, 45, size=3)
  for o in objs:
    s, colour = o["size"], np.asarray(COLOURS[o["colour"]], np.float32)
    colour = colour + rng.uniform(-15, 15, size=3)
    box = img[o["y"]:o["y"] + s, o["x"]:o["x"] + s]
    box[_mask(o["shape"], s)] = colour
  img += rng.normal(0, 6, size=img.shape)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption(objs: list[dict]) -> str:
  """The shapes left to right: 'a red square, a blue circle and a green triangle.'"""
  names = [f"a {o['colour']} {o['shape']}" for o in objs]
  text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return text + "."


def questions(objs: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
  """(type, question, answer) for one scene; types whose question would be ambiguous
  (a shape / colour that is not unique) are left out."""
  shapes = [o["shape"] for o in objs]
  colours = [o["colour"] for o in objs]
  out = []
  unique = [o for o in objs if shapes.count(o["shape"]) == 1]
  if unique:
    o = unique[rng.integers(len(unique))]
    out.append(("colour_of_shape", f"What color is the {o['shape']}?", o["colour"]))
  unique = [o for o in objs if colours.count(o["colour"]) == 1]
  if unique:
    o = unique[rng.integers(len(unique))]
    out.append(("shape_of_colour", f"What shape is the {o['colour']} object?", o["shape"]))
  out.append(("count_all", "How many shapes are there?", NUMBERS[len(objs)]))
  shape = SHAPES[rng.integers(3)]
  out.append(("count_shape", f"How many {shape}s are there?", NUMBERS[shapes.count(shape)]))
  present = {(o["colour"], o["shape"]) for o in objs}
  if rng.random() < 0.5:  # balanced yes / no
    colour, shape = sorted(present)[rng.integers(len(present))]
  else:
    absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - present)
    colour, shape = absent[rng.integers(len(absent))]
  out.append(("exists", f"Is there a {colour} {shape}?",
              "yes" if (colour, shape) in present else "no"))
  if len(objs) > 1:  # with one shape "leftmost" would be a shape question in disguise
    out.append(("leftmost_shape", "What is the leftmost shape?", objs[0]["shape"]))
    out.append(("rightmost_colour", "What color is the rightmost shape?",
                objs[-1]["colour"]))
  return out
