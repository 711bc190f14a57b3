"""Launch dry-runs print the exact commands."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), "--dry-run", *args],
                       capture_output=True, text=True, check=True)
  return out.stdout


def test_tpu_pod_dry_run():
  out = _dry("tpu_pod.py", "--name", "saisa-pod", "--zone", "us-east5-a", "--accelerator",
             "v5p-64", "--workdir", "gs://b/run", "--config", "configs/saisa.py:llm=vicuna7b",
             "--spot", "--", "--config.finetune.steps=10")
  lines = [l for l in out.splitlines() if l.startswith("+ ")]
  assert lines[0] == ("+ gcloud compute tpus tpu-vm create saisa-pod --zone=us-east5-a "
                      "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot")
  assert lines[1] == ("+ gcloud compute tpus tpu-vm scp --recurse . 'saisa-pod:~/saisa-jax' "
                      "--worker=all --zone=us-east5-a")
  assert "--worker=all" in lines[2] and "pip install -q -e .[tpu]" in lines[2]
  assert lines[3].startswith("+ gcloud compute tpus tpu-vm ssh saisa-pod --worker=all")
  assert ("saisa-train --config=configs/saisa.py:llm=vicuna7b --workdir=gs://b/run "
          "--config.train.distributed=True --config.finetune.steps=10") in lines[3]
  assert "describe saisa-pod '--format=value(state)' --zone=us-east5-a" in lines[4]
  assert lines[5].startswith("+ gcloud compute tpus tpu-vm delete saisa-pod --quiet")


def test_tpu_pod_reuse_skips_creation_in_the_plan():
  out = _dry("tpu_pod.py", "--name", "p", "--zone", "z", "--workdir", "gs://b", "--config",
             "c.py", "--reuse")
  assert "# create (skipped: --reuse)" in out


def test_slurm_dry_run():
  out = _dry("slurm.py", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
             "--workdir", "/shared/run", "--config", "configs/saisa.py:llm=vicuna7b",
             "--", "--config.data.batch_size=128")
  assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out
  assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --requeue" in out
  assert "#SBATCH --signal=B:TERM@120" in out and "#SBATCH --partition=gpu" in out
  assert ("srun --kill-on-bad-exit=1 saisa-train --config=configs/saisa.py:llm=vicuna7b "
          "--workdir=/shared/run --config.train.distributed=True "
          "--config.data.batch_size=128") in out
  assert out.rstrip().endswith("+ sbatch /shared/run/saisa_train.sbatch")
