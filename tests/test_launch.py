"""Launch scripts and multi-process setup: SLURM/TPU env -> jax.distributed arguments, tpu_vm.sh commands."""

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from cat_jax import distributed
from conftest import xla_flags
from cat_jax.distributed import distributed_init_kwargs, maybe_initialize_distributed

ROOT = Path(__file__).resolve().parents[1]
TPU_VM = ROOT / "launch" / "tpu_vm.sh"
SBATCH = ROOT / "launch" / "gpu_slurm.sbatch"


def test_expand_tasks_per_node():
  assert distributed.expand_tasks_per_node("8(x2),4") == [8, 8, 4]
  assert distributed.expand_tasks_per_node("1") == [1]
  with pytest.raises(ValueError):
    distributed.expand_tasks_per_node("8(2)")


# --- SLURM layouts -------------------------------------------------------------------------------------

def slurm_env(*, nodes="gpu-[01-02]", ntasks=16, procid=0, localid=0, nodeid=0, per_node="8(x2)",
              **extra):
  env = {
      "SLURM_JOB_ID": "5000", "SLURM_JOB_NODELIST": nodes, "SLURM_STEP_NODELIST": nodes,
      "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_PROCID": str(procid),
      "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), "SLURM_STEP_TASKS_PER_NODE": per_node,
  }
  env.update(extra)
  return env


def jax_initialize_arguments(env, monkeypatch, **kwargs):
  """What ``jax.distributed.initialize(**kwargs)`` settles on under ``env``: JAX's own cluster detection."""
  from jax._src import clusters  # private, so only here: the reference for what JAX detects by itself

  for name in list(os.environ):
    if name.startswith(("SLURM_", "JAX_", "TPU_", "OMPI_", "CUDA_")):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  if kwargs.get("cluster_detection_method") == "deactivate":
    return kwargs["coordinator_address"], kwargs["num_processes"], kwargs["process_id"], None
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      kwargs.get("coordinator_address"), kwargs.get("num_processes"), kwargs.get("process_id"),
      kwargs.get("local_device_ids"), None, 300)


def test_jax_alone_gives_each_slurm_task_one_gpu_we_fill_the_gap(monkeypatch):
  """The gap this module exists for, shown on JAX's own detection under a simulated SLURM step."""
  port = 61440 + 5000 % 4096
  # One task per node owning 8 GPUs: JAX alone pins it to GPU [SLURM_LOCALID] = [0].
  env = slurm_env(ntasks=2, procid=1, nodeid=1, per_node="1(x2)", SLURM_GPUS_PER_TASK="8",
                  CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert jax_initialize_arguments(env, monkeypatch) == (f"gpu-01:{port}", 2, 1, [0])
  kwargs = distributed_init_kwargs(env)
  assert kwargs == {"num_processes": 2, "local_device_ids": list(range(8))}
  assert jax_initialize_arguments(env, monkeypatch, **kwargs) == (f"gpu-01:{port}", 2, 1, list(range(8)))

  # --gpus-per-task=1 with binding: task 11 sees only its GPU, as device 0; JAX alone asks for device 3.
  env = slurm_env(procid=11, localid=3, nodeid=1, SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="3")
  assert jax_initialize_arguments(env, monkeypatch)[3] == [3]
  kwargs = distributed_init_kwargs(env)
  assert jax_initialize_arguments(env, monkeypatch, **kwargs) == (f"gpu-01:{port}", 16, 11, [0])

  # A step of 2 tasks inside an allocation of 4: JAX alone waits for 4 processes.
  env = slurm_env(ntasks=4, per_node="2(x2)", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2")
  assert jax_initialize_arguments(env, monkeypatch)[1] == 4
  assert jax_initialize_arguments(env, monkeypatch, **distributed_init_kwargs(env))[1] == 2


def test_no_cluster_is_single_process():
  assert distributed_init_kwargs({}) is None
  assert distributed_init_kwargs({"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1"}) is None
  # sbatch without srun: the batch step is one process, whatever the allocation.
  assert distributed_init_kwargs({k: v for k, v in slurm_env().items() if k != "SLURM_STEP_NODELIST"}) is None


def test_single_slurm_task_is_single_process():
  assert distributed_init_kwargs(slurm_env(nodes="gpu-05", ntasks=1, per_node="1")) is None


def test_process_per_gpu_sharing_visibility():
  # No binding: every task sees all 8 GPUs and must pick its own by SLURM_LOCALID.
  env = slurm_env(procid=11, localid=3, nodeid=1, SLURM_GPUS_PER_TASK="h100:1",
                  CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed_init_kwargs(env)["local_device_ids"] == [3]


def test_two_gpus_per_task_without_binding():
  env = slurm_env(ntasks=8, procid=6, localid=2, nodeid=1, per_node="4(x2)", SLURM_GPUS_PER_TASK="2",
                  CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed_init_kwargs(env)["local_device_ids"] == [4, 5]


def test_gpus_split_by_tasks_per_node_when_gpus_per_task_missing():
  # --ntasks-per-node=4 --gpus-per-node=8: 2 GPUs each, chosen by local id.
  env = slurm_env(ntasks=8, procid=5, localid=1, nodeid=1, per_node="4(x2)",
                  CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  assert distributed_init_kwargs(env)["local_device_ids"] == [2, 3]


def test_process_per_node_uses_all_gpus():
  for extra in ({"SLURM_GPUS_PER_TASK": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
                {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c,GPU-d,GPU-e,GPU-f,GPU-g,GPU-h"}):
    kwargs = distributed_init_kwargs(slurm_env(ntasks=3, procid=2, nodeid=2, nodes="gpu-[01-03]",
                                               per_node="1(x3)", **extra))
    assert kwargs == {"num_processes": 3, "local_device_ids": list(range(8))}


def test_cpu_only_tasks_leave_devices_to_jax():
  for extra in ({"SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": ""}, {}):
    assert distributed_init_kwargs(slurm_env(procid=3, localid=3, **extra)) == {"num_processes": 16}


@pytest.mark.parametrize("bad", [
    {"SLURM_PROCID": "16"},
    {"SLURM_PROCID": "x"},
    {"SLURM_GPUS_PER_TASK": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_LOCALID": "2"},
    {"CUDA_VISIBLE_DEVICES": "0,1,2", "SLURM_STEP_TASKS_PER_NODE": "2(x8)"},
])
def test_inconsistent_slurm_settings_raise(bad):
  with pytest.raises(ValueError):
    distributed_init_kwargs(slurm_env(**bad))


# --- Explicit variables, TPU pods, Open MPI ------------------------------------------------------------

def test_explicit_jax_variables(monkeypatch):
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  # Explicit settings win over the SLURM allocation they may run inside, and JAX detects nothing on top.
  env.update(slurm_env())
  kwargs = distributed_init_kwargs(env)
  assert kwargs == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                    "cluster_detection_method": "deactivate"}
  assert jax_initialize_arguments(env, monkeypatch, **kwargs) == ("10.0.0.2:1234", 4, 3, None)
  assert distributed_init_kwargs({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
  for partial in ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
                  {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}):
    with pytest.raises(ValueError):
      distributed_init_kwargs(partial)


@pytest.mark.parametrize("env, expected", [
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3", "TPU_WORKER_ID": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2", "MEGASCALE_NUM_SLICES": "2"}, {}),
    ({"CLOUD_TPU_TASK_ID": "1"}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, {}),
    ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, None),
    ({"CAT_DISTRIBUTED": "auto"}, {}),
    ({"CAT_DISTRIBUTED": "off", "TPU_WORKER_HOSTNAMES": "a,b"}, None),
])
def test_clusters_jax_detects_itself(env, expected):
  assert distributed_init_kwargs(env) == expected


def test_cat_distributed_off_beats_slurm_and_bad_value_raises():
  assert distributed_init_kwargs(dict(slurm_env(), CAT_DISTRIBUTED="0")) is None
  with pytest.raises(ValueError):
    distributed_init_kwargs({"CAT_DISTRIBUTED": "yes-please"})


def test_maybe_initialize_calls_jax_only_when_multi_process(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert maybe_initialize_distributed({}) is None
  assert maybe_initialize_distributed(slurm_env(ntasks=1, nodes="n1", per_node="1")) is None
  assert calls == []
  assert maybe_initialize_distributed({"TPU_WORKER_HOSTNAMES": "a,b"}) == {}
  env = slurm_env(procid=9, localid=1, nodeid=1, SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="1")
  kwargs = maybe_initialize_distributed(env)
  assert calls == [{}, kwargs] and kwargs == {"num_processes": 16, "local_device_ids": [0]}


_TWO_PROCESS_CHILD = textwrap.dedent("""
    import json, os, jax
    from cat_jax.distributed import maybe_initialize_distributed
    kwargs = maybe_initialize_distributed()
    print(json.dumps({"kwargs": kwargs, "count": jax.process_count(), "index": jax.process_index(),
                      "devices": jax.device_count()}), flush=True)
    jax.distributed.shutdown()
""")


def test_two_real_processes_from_slurm_variables(tmp_path):
  """Two CPU processes started as srun would: JAX's detection plus ours join one 2-process runtime."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "TPU_", "CAT_", "OMPI_"))}
  base.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2),
              JAX_COORDINATOR_PORT=str(port))
  base.pop("CUDA_VISIBLE_DEVICES", None)
  procs = []
  for rank in range(2):
    env = dict(base, **slurm_env(nodes="localhost", ntasks=2, procid=rank, localid=rank, per_node="2"))
    procs.append(subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_CHILD], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert [r["index"] for r in results] == [0, 1]
  for r in results:
    assert r["count"] == 2 and r["devices"] == 4
    assert r["kwargs"] == {"num_processes": 2}


# --- Shell scripts -------------------------------------------------------------------------------------

def test_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck is not installed (apt-get install -y shellcheck); CI must provide it")
  result = subprocess.run([shellcheck, "--severity=style", str(TPU_VM), str(SBATCH)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_header_and_srun_line(monkeypatch):
  from jax._src.clusters import slurm_cluster

  text = SBATCH.read_text()
  for directive in ("--ntasks-per-node=8", "--gpus-per-task=1", "--requeue"):
    assert f"#SBATCH {directive}" in text
  assert 'srun --kill-on-bad-exit=1' in text
  assert '-m cat_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"' in text
  # The port the script reports is the one JAX's SLURM detection derives from the job id.
  assert "${JAX_COORDINATOR_PORT:-$((61440 + SLURM_JOB_ID % 4096))}" in text
  monkeypatch.setenv("SLURM_JOB_ID", "777")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "n[1-2]")
  assert slurm_cluster.SlurmCluster.get_coordinator_address(None, None) == f"n1:{61440 + 777 % 4096}"


FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # Test double for gcloud: logs argv; 'describe' answers from a queue of states; training ssh calls
    # answer from a queue of exit codes; 'scp' records the tarball's file list.
    import json, os, sys, tarfile
    log = os.environ["FAKE_GCLOUD_DIR"] + "/calls.jsonl"
    argv = sys.argv[1:]
    entry = {{"argv": argv}}
    def pop(name, default):
      path = os.path.join(os.environ["FAKE_GCLOUD_DIR"], name)
      lines = open(path).read().splitlines() if os.path.exists(path) else []
      if not lines:
        return default
      open(path, "w").write("\\n".join(lines[1:]))
      return lines[0]
    rc = 0
    if "describe" in argv:
      state = pop("states", "READY")
      if state == "ABSENT":
        rc = 1
      else:
        print(state)
    elif "scp" in argv:
      entry["tar"] = tarfile.open(argv[argv.index("scp") + 1]).getnames()
    elif "ssh" in argv and any("cat_jax.train" in a for a in argv):
      rc = int(pop("train_rcs", "0"))
    with open(log, "a") as f:
      f.write(json.dumps(entry) + "\\n")
    sys.exit(rc)
""")


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "CAT_", "CLOUDSDK_"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_GCLOUD_DIR=str(tmp_path),
             TMPDIR=str(tmp_path), CAT_POLL_SECONDS="0")

  def launch(*args, states=(), train_rcs=()):
    (tmp_path / "states").write_text("\n".join(states))
    (tmp_path / "train_rcs").write_text("\n".join(str(rc) for rc in train_rcs))
    (tmp_path / "calls.jsonl").write_text("")
    result = subprocess.run(["bash", str(TPU_VM), *args], env=env, capture_output=True, text=True,
                            timeout=60)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return result, calls

  return launch


POD_ARGS = ("--name", "cat-pod", "--zone", "us-central2-b", "--project", "my-proj", "--type", "v4-32",
            "--workdir", "gs://bkt/cat/run1", "--config", "configs/cat.py:imagenet")


def remote_command(argv):
  """The shell line that a `gcloud ... ssh --command=...` call runs on the workers."""
  commands = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
  assert len(commands) == 1, argv
  return commands[0]


def test_dry_run_pod_commands(fake_gcloud):
  result, calls = fake_gcloud(
      *POD_ARGS, "--queued", "--spot", "--data-dir", "gs://bkt/tfds", "--env", "MSG=it's fine",
      "--teardown", "--dry-run", "--", "--config.train.num_steps=10")
  assert result.returncode == 0, result.stderr
  assert calls == []  # dry run: gcloud never runs
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  gflags = ["--zone=us-central2-b", "--project=my-proj"]
  assert lines[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "cat-pod", *gflags,
                      "--format=value(state.state)"]
  assert lines[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "cat-pod",
                      "--node-id=cat-pod", *gflags, "--accelerator-type=v4-32",
                      "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  # Local copy: tarball of the checkout, scp to every worker, unpack.
  assert lines[2][:2] == ["bash", "-c"] and "git -C" in lines[2][2] and "tar -czf" in lines[2][2]
  tarball = lines[3][5]
  assert lines[3] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "cat-pod:cat_jax.tar.gz",
                      *gflags, "--worker=all"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cat-pod", *gflags, "--worker=all"]
  assert lines[4][:-1] == ssh and "tar -xzf ~/cat_jax.tar.gz -C ~/cat_jax" in remote_command(lines[4])
  install = shlex.split(remote_command(lines[5]))
  assert lines[5][:-1] == ssh
  assert install[:3] == ["cd", "~/cat_jax", "&&"]
  assert install[-7:] == ["python3", "-m", "pip", "install", "--user", "-e", ".[tpu]"]
  # Training on every worker, with the environment the trainer needs, after stopping a stale trainer.
  assert lines[6][:-1] == ssh
  train_line = remote_command(lines[6])
  assert train_line.startswith("cd ~/cat_jax && ")
  train = shlex.split(train_line.rsplit("; exec ", 1)[1])
  assert train == ["env", "CAT_DISTRIBUTED=auto", "PYTHONUNBUFFERED=1", "TFDS_DATA_DIR=gs://bkt/tfds",
                   "MSG=it's fine", "python3", "-m", "cat_jax.train", "--config", "configs/cat.py:imagenet",
                   "--workdir", "gs://bkt/cat/run1", "--config.train.num_steps=10"]
  assert "kill -0" in train_line and "tee -a ~/cat_train.log" in train_line
  # --teardown: the queued resource (and its VM) is deleted at the end.
  assert lines[7] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "cat-pod", *gflags,
                      "--force", "--quiet"]
  assert len(lines) == 8


def test_dry_run_vm_from_git_reserved_no_teardown(fake_gcloud):
  result, calls = fake_gcloud(
      "--name=cat-v5e", "--zone=us-west4-a", "--type=v5litepod-16", "--reserved", "--workdir=gs://b/r",
      "--repo", "https://github.com/example/cat_jax.git", "--branch", "dev", "--dry-run",
      "--config.data.batch_size=256")
  assert result.returncode == 0, result.stderr
  assert calls == []
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "cat-v5e"]
  assert lines[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "cat-v5e", "--zone=us-west4-a",
                      "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--reserved"]
  clone = remote_command(lines[2])
  assert "git clone --depth=1 --branch dev https://github.com/example/cat_jax.git ~/cat_jax" in clone
  assert "--worker=all" in lines[2] and not any("scp" in line for line in lines)
  train = shlex.split(remote_command(lines[4]).rsplit("; exec ", 1)[1])
  assert train[-5:] == ["--config", "configs/cat.py", "--workdir", "gs://b/r", "--config.data.batch_size=256"]
  assert not any("delete" in line for line in lines) and len(lines) == 5


@pytest.mark.parametrize("args, message", [
    (("--zone", "z", "--workdir", "gs://b/r"), "--name"),
    (("--name", "n", "--workdir", "gs://b/r"), "--zone"),
    (("--name", "n", "--zone", "z"), "--workdir"),
    (("--name", "n", "--zone", "z", "--workdir", "/tmp/run"), "gs://"),
    (("--name", "n", "--zone", "z", "--workdir", "gs://b/r", "--type", "v9-8"), "--runtime"),
    (("--name", "n", "--zone", "z", "--workdir", "gs://b/r", "--bogus"), "unknown flag"),
    (("--name", "n", "--zone", "z", "--workdir", "gs://b/r", "--env", "1X=2"), "KEY=VALUE"),
])
def test_bad_flags_fail_before_any_command(fake_gcloud, args, message):
  result, calls = fake_gcloud(*args, "--dry-run")
  assert result.returncode != 0 and message in result.stderr
  assert result.stdout == "" and calls == []


def test_rerun_reuses_ready_tpu_and_copies_real_tarball(fake_gcloud, tmp_path):
  result, calls = fake_gcloud(*POD_ARGS, states=["READY"])
  assert result.returncode == 0, result.stderr
  verbs = [c["argv"][2:4] for c in calls]
  assert verbs == [["tpu-vm", "describe"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"],
                   ["tpu-vm", "ssh"]]
  files = calls[1]["tar"]
  assert "launch/tpu_vm.sh" in files and "cat_jax/distributed.py" in files
  assert not any(f.startswith((".git/", "venv/")) for f in files)
  assert not list(tmp_path.glob("cat_jax-*.tar.gz"))  # removed on exit


def test_preempted_tpu_is_recreated(fake_gcloud):
  result, calls = fake_gcloud(*POD_ARGS, "--queued", "--repo", "r", states=["SUSPENDED", "ACTIVE"])
  assert result.returncode == 0, result.stderr
  verbs = [c["argv"][2:4] for c in calls]
  assert verbs[:4] == [["queued-resources", "describe"], ["queued-resources", "delete"],
                       ["queued-resources", "create"], ["queued-resources", "describe"]]
  assert verbs[4:] == [["tpu-vm", "ssh"]] * 3


def test_preemption_during_training_restarts(fake_gcloud):
  # Absent -> create -> READY; training dies (exit 255) with the VM PREEMPTED; recreate and run again.
  result, calls = fake_gcloud(*POD_ARGS, "--repo", "r", "--max-restarts", "1", "--teardown",
                              states=["ABSENT", "READY", "PREEMPTED", "PREEMPTED", "READY"],
                              train_rcs=[255, 0])
  assert result.returncode == 0, result.stderr
  verbs = [c["argv"][3] for c in calls]
  assert verbs == ["describe", "create", "describe", "ssh", "ssh", "ssh",  # first attempt
                   "describe",                                          # after the failure
                   "describe", "delete", "create", "describe", "ssh", "ssh", "ssh",  # second attempt
                   "delete"]                                            # --teardown


def test_failure_on_healthy_tpu_is_not_retried(fake_gcloud):
  result, calls = fake_gcloud(*POD_ARGS, "--repo", "r", "--max-restarts", "3", states=["READY", "READY"],
                              train_rcs=[3])
  assert result.returncode == 3
  assert [c["argv"][3] for c in calls] == ["describe", "ssh", "ssh", "ssh", "describe"]
  assert "not retrying" in result.stderr
