"""EAS's redundancy search (../shared/reference/eas.md), a training stage.

One score per decoder layer, p = sigmoid(scores). Step t trains the adapters with a
sampled skip set of k_t = min(K, floor(2 K t / warmup) + 1) layers, drawn without
replacement in proportion to p. Every `every` steps after the warm-up, `candidates`
distinct sets of K layers are drawn the same way, each one's loss on the current batch
is computed without gradients, and with reward R_j = exp(-loss_j) and baseline R = the
mean of R_j, every layer i of set j gets

    score_i += lr (R_j - R) p_i (1 - p_i).

The result is the K layers with the highest scores. The draws are made on the host
from (seed, step) alone, so every process of a pod draws the same sets, and a resumed
run the sets it would have drawn; the scores live in the train state (checkpointed).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  k: int                 # layers to skip in the end (K)
  every: int = 3         # score the candidates every this many steps ...
  warmup: int = 100      # ... after this many (and k_t grows to K over warmup / 2)
  candidates: int = 5    # distinct candidate sets per scoring
  lr: float = 1.0
  seed: int = 0

  @classmethod
  def from_config(cls, section, num_layers: int, default_warmup: int) -> "SearchConfig":
    d = dict(section or {})
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"config.eas_search has unknown fields {unknown}")
    if d.get("warmup") is None:
      d["warmup"] = default_warmup
    out = cls(**d)
    if not 0 < out.k < num_layers:
      raise ValueError(f"config.eas_search.k={out.k}: skip between 1 and "
                       f"{num_layers - 1} of the LLM's {num_layers} layers")
    if out.every <= 0 or out.candidates < 2:
      raise ValueError("config.eas_search needs every >= 1 and candidates >= 2 (the "
                       "reward baseline is their mean)")
    return out


def probabilities(scores) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(scores, np.float64)))


def layers_this_step(cfg: SearchConfig, step: int) -> int:
  """k_t for step t (0-based)."""
  return int(min(cfg.k, (2 * cfg.k * step) // max(cfg.warmup, 1) + 1))


def draw(rng: np.random.Generator, p: np.ndarray, k: int) -> np.ndarray:
  """k distinct layers drawn one after another in proportion to p (Gumbel top-k on
  log p: the same law) -> bool[layers]."""
  keys = np.log(np.maximum(p, 1e-30)) + rng.gumbel(size=p.shape)
  flags = np.zeros(p.shape, bool)
  flags[np.argsort(-keys)[:k]] = True
  return flags


def _rng(cfg: SearchConfig, step: int, what: int) -> np.random.Generator:
  return np.random.default_rng([cfg.seed, step, what])


def train_set(cfg: SearchConfig, scores, step: int) -> np.ndarray:
  """The skip set step `step` trains with: bool[layers]."""
  return draw(_rng(cfg, step, 0), probabilities(scores), layers_this_step(cfg, step))


def scoring_due(cfg: SearchConfig, step: int) -> bool:
  """After step `step` (1-based count of steps done), score the candidates?"""
  return step > cfg.warmup and step % cfg.every == 0


def candidate_sets(cfg: SearchConfig, scores, step: int) -> np.ndarray:
  """`candidates` distinct K-layer sets, bool[candidates, layers] (fewer when fewer
  sets exist)."""
  p = probabilities(scores)
  n = len(p)
  possible = int(np.prod(range(n - cfg.k + 1, n + 1)) // np.prod(range(1, cfg.k + 1)))
  want = min(cfg.candidates, possible)
  rng, seen, out = _rng(cfg, step, 1), set(), []
  for _ in range(1000 * want):
    flags = draw(rng, p, cfg.k)
    key = tuple(np.flatnonzero(flags))
    if key not in seen:
      seen.add(key)
      out.append(flags)
      if len(out) == want:
        break
  return np.stack(out)


def update(scores, sets, losses, lr: float) -> np.ndarray:
  """score_i += lr (R_j - mean R) p_i (1 - p_i) for every layer i of set j; p from the
  scores before the update. sets bool[C, layers], losses float[C] -> new scores."""
  scores = np.asarray(scores, np.float64)
  p = probabilities(scores)
  rewards = np.exp(-np.asarray(losses, np.float64))
  advantage = rewards - rewards.mean()
  step = (np.asarray(sets, np.float64) * advantage[:, None]).sum(axis=0)
  return (scores + lr * step * p * (1 - p)).astype(np.float32)


def top_k(scores, k: int) -> tuple:
  """The K layers with the highest scores, in layer order (ties: the lower layer)."""
  order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
  return tuple(sorted(order[:k]))
