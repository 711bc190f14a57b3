"""8 simulated CPU devices, mesh data=2 x fsdp=2 x tensor=2: the same losses as one
device (float32, 1e-5), with parameters really sharded and the activation sharding
constraints of the model present in the lowered step."""
import json
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {here!r})
    from train_helpers import small_config
    from saisa_jax.data.pipeline import make_iterator
    from saisa_jax.core.mesh import make_mesh
    from saisa_jax.train.stages import stage_config
    from saisa_jax.core.state import init_state
    from saisa_jax.train.trainer import setup_stage, to_global

    sc = stage_config(small_config({embedded!r}), "finetune")
    it = make_iterator(sc)
    batches = [next(it) for _ in range(3)]
    out = {{"devices": jax.device_count()}}
    for name, shape, devices in [("single", {{"data": 1}}, jax.devices()[:1]),
                                 ("mesh", {{"data": 2, "fsdp": 2, "tensor": 2}}, jax.devices())]:
      mesh = make_mesh(shape, devices)
      setup = setup_stage(sc, mesh)
      state = init_state(setup.model, setup.cfg, setup.tx, setup.shardings, jax.random.key(0))
      losses = []
      for b in batches:
        state, m = setup.step_fn(state, to_global(b, mesh))
        losses.append(float(m["loss"]))
      out[name] = losses
      w = state["params"]["decoder"]["layers"]["gate_proj"]["kernel"]  # [layers, embed, mlp]
      out[name + "_fraction"] = w.addressable_shards[0].data.nbytes / w.nbytes
      out[name + "_spec"] = str(w.sharding.spec)
      out[name + "_devices"] = len(w.sharding.device_set)
      # The model's activation constraints reach XLA (the mesh and rules are set
      # while tracing): e.g. the FFN's [batch, length, mlp] over (data, fsdp), tensor.
      text = setup.step_fn.lower(state, to_global(batches[0], mesh)).as_text()
      out[name + "_constraints"] = text.count("sharding_constraint")
      out[name + "_batch_tensor"] = any('{{"data", "fsdp"}}' in l and '{{"tensor"}}' in l
                                        for l in text.splitlines() if "sharding_constraint" in l)
    print("RESULT " + json.dumps(out))
""")


def test_mesh_2x2x2_matches_one_device(embedded):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(here=HERE, embedded=embedded)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert out["devices"] == 8
  for a, b in zip(out["mesh"], out["single"]):
    assert abs(a - b) <= 1e-5, (out["mesh"], out["single"])
  # embed -> fsdp (2) and mlp -> tensor (2): each device holds a quarter of the weight.
  assert out["mesh_fraction"] == 0.25, out["mesh_spec"]
  assert out["single_fraction"] == 1.0
  assert out["mesh_devices"] == 8
  assert out["mesh_constraints"] > 10 and out["mesh_batch_tensor"], out
