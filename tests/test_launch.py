"""Launch dry-runs print the exact commands."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, check=True):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), "--dry-run", *args],
                       capture_output=True, text=True, check=check)
  return out.stdout if check else out


def _plan(out):
  """{phase: [commands]} from a dry-run."""
  phases, cur = {}, None
  for line in out.splitlines():
    if line.startswith("# "):
      cur = phases.setdefault(line[2:], [])
    elif line.startswith("+ "):
      cur.append(line[2:])
  return phases


def test_tpu_pod_dry_run():
  out = _dry("tpu_pod.py", "--name", "saisa-pod", "--zone", "us-east5-a", "--accelerator",
             "v5p-64", "--workdir", "gs://b/run", "--config", "configs/saisa.py:llm=vicuna7b",
             "--spot", "--", "--config.finetune.steps=10")
  plan = _plan(out)
  assert plan["create"] == [
      "gcloud compute tpus queued-resources create saisa-pod --node-id=saisa-pod "
      "--zone=us-east5-a --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot"]
  assert plan["state"] == ["gcloud compute tpus queued-resources describe saisa-pod "
                           "'--format=value(state.state)' --zone=us-east5-a"]
  # Only the source is copied (no runs/, no benchmarks/), into a fresh folder.
  assert plan["setup"][0].endswith("'--command=rm -rf ~/saisa-jax && mkdir -p ~/saisa-jax'")
  assert plan["setup"][1] == (
      "gcloud compute tpus tpu-vm scp --recurse ./saisa_jax ./configs ./launch "
      "./pyproject.toml ./README.md 'saisa-pod:~/saisa-jax/' --worker=all --zone=us-east5-a")
  assert "--worker=all" in plan["setup"][2] and "pip install -q -e .[tpu]" in plan["setup"][2]
  # A stale trainer holding the TPU is killed before each start.
  assert "pkill -9 -f" in plan["clear"][0] and "libtpu_lockfile" in plan["clear"][0]
  # The job runs detached on every worker, its log and exit code kept there.
  start = plan["start"][0]
  assert start.startswith("gcloud compute tpus tpu-vm ssh saisa-pod --worker=all")
  assert "setsid nohup bash -c" in start and start.rstrip("'").endswith("&")
  assert ("saisa-train --config=configs/saisa.py:llm=vicuna7b --workdir=gs://b/run "
          "--config.train.distributed=True --config.finetune.steps=10 >> ~/saisa-train.log "
          "2>&1; echo $? > ~/saisa-train.exit") in start
  assert "cat ~/saisa-train.exit" in plan["poll"][0]
  assert plan["if the slice is preempted: delete, then create ... start again"] == [
      "gcloud compute tpus queued-resources delete saisa-pod --force --quiet --zone=us-east5-a"]


def test_tpu_pod_runtime_follows_the_generation():
  for acc, version in (("v5litepod-256", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e"),
                       ("v4-32", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5")):
    plan = _plan(_dry("tpu_pod.py", "--name", "p", "--zone", "z", "--accelerator", acc,
                      "--workdir", "gs://b", "--config", "c.py", "--reserved"))
    assert plan["create"][0].endswith(f"--runtime-version={version} --reserved"), plan["create"]


def test_tpu_pod_without_queue_and_reuse():
  plan = _plan(_dry("tpu_pod.py", "--name", "p", "--zone", "z", "--accelerator", "v5litepod-16",
                    "--workdir", "gs://b", "--config", "c.py", "--no-queue"))
  assert plan["create"] == ["gcloud compute tpus tpu-vm create p --zone=z "
                            "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"]
  out = _dry("tpu_pod.py", "--name", "p", "--zone", "z", "--workdir", "gs://b", "--config",
             "c.py", "--reuse")
  assert "# create (skipped: --reuse)" in out and "queued-resources create" not in out


def test_tpu_pod_refuses_a_local_workdir():
  out = _dry("tpu_pod.py", "--name", "p", "--zone", "z", "--workdir", "runs/x", "--config",
             "c.py", check=False)
  assert out.returncode == 2 and "must be a bucket (gs://" in out.stderr


def test_tpu_pod_reads_the_workers_exit_codes():
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  import tpu_pod
  assert tpu_pod.exit_codes("running\n0\n") == ["running", "0"]
  assert tpu_pod.exit_codes("Using ssh batch size of 1.\n143\n143\n") == ["143", "143"]


def test_slurm_dry_run():
  out = _dry("slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
             "--workdir", "/shared/run", "--config", "configs/saisa.py:llm=vicuna7b",
             "--", "--config.data.batch_size=128")
  assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out
  assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --requeue" in out
  # The warning reaches the srun tasks (B: would signal only the batch shell).
  assert "#SBATCH --signal=TERM@120" in out and "B:TERM" not in out
  assert "#SBATCH --partition=gpu" in out
  assert ("srun --kill-on-bad-exit=1 saisa-train --config=configs/saisa.py:llm=vicuna7b "
          "--workdir=/shared/run --config.train.distributed=True "
          "--config.data.batch_size=128") in out
  # A trainer that saved on SIGTERM (exit 143) has its job requeued.
  assert 'if [ "$code" -eq 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi' in out
  assert out.rstrip().endswith("+ sbatch /shared/run/saisa_train.sbatch")


def test_slurm_script_requeues_after_143(tmp_path):
  """The generated script itself, with srun and scontrol stubbed: exit 143 requeues."""
  script = _dry("slurm.py", "--nodes", "1", "--workdir", str(tmp_path), "--config", "c.py")
  body = script.split("\n", 1)[1].rsplit("+ sbatch", 1)[0]
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text("#!/bin/sh\nexit 143\n")
  (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeued\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  path = tmp_path / "job.sh"
  path.write_text(body)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42")
  assert subprocess.run(["bash", str(path)], env=env).returncode == 143
  assert (tmp_path / "requeued").read_text().strip() == "requeue 42"
