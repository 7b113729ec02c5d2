#!/usr/bin/env bash
# Train cat_jax on a Cloud TPU VM or pod slice: create (if absent) -> copy code -> install -> train on
# every worker -> optionally delete. Safe to re-run with the same --name and --workdir: an existing TPU is
# reused, a preempted one is recreated, and the trainer resumes from the last checkpoint in the workdir.
#
#   launch/tpu_vm.sh --name cat-v4 --zone us-central2-b --project my-proj --type v4-32 --spot --queued \
#     --workdir gs://my-bucket/cat/run1 --data-dir gs://my-bucket/tfds --config configs/cat.py \
#     --teardown -- --config.<key>=<value>
#
# Run with --help for every flag; see docs/launch.md for the full walk-through.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [flags] [-- trainer flags...]

TPU (flag, then environment fallback):
  --name NAME          TPU VM / queued resource name           ($TPU_NAME)
  --zone ZONE          e.g. us-central2-b                      ($TPU_ZONE, $CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT    GCP project; gcloud's default if unset  ($TPU_PROJECT, $CLOUDSDK_CORE_PROJECT)
  --type TYPE          accelerator type, default v4-32         ($TPU_TYPE)
  --runtime VERSION    TPU software version; default from the type   ($TPU_RUNTIME)
  --spot | --reserved  capacity; default on-demand             ($TPU_CAPACITY=spot|reserved|on-demand)
  --queued             request through a queued resource       ($TPU_QUEUED=1)

Code (default: copy this checkout's tracked and untracked-not-ignored files with scp):
  --repo URL           git clone URL on every worker instead   ($CAT_REPO)
  --branch BRANCH      branch or tag for --repo, default main  ($CAT_BRANCH)

Training:
  --workdir gs://...   checkpoints and logs; must be on GCS    ($CAT_WORKDIR)
  --config PATH[:VAR]  default configs/cat.py                  ($CAT_CONFIG)
  --data-dir gs://...  passed to the trainer as TFDS_DATA_DIR  ($CAT_DATA_DIR)
  --env KEY=VALUE      extra environment for the trainer (repeatable)
  --config.KEY=VALUE   trainer config override (also anything after --)
  --max-restarts N     recreate and resume this many times after a preemption, default 0

Lifecycle:
  --teardown           delete the TPU when the script exits (after training, or on failure)
  --dry-run            print every command instead of running it
  -h, --help           this text
EOF
}

log() { echo "[tpu_vm] $*" >&2; }
die() {
  echo "[tpu_vm] error: $*" >&2
  exit 2
}

# --- Flags ---------------------------------------------------------------------------------------------
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
PROJECT="${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
TYPE="${TPU_TYPE:-v4-32}"
RUNTIME="${TPU_RUNTIME:-}"
CAPACITY="${TPU_CAPACITY:-on-demand}"
QUEUED="${TPU_QUEUED:-0}"
REPO="${CAT_REPO:-}"
BRANCH="${CAT_BRANCH:-main}"
WORKDIR="${CAT_WORKDIR:-}"
CONFIG="${CAT_CONFIG:-configs/cat.py}"
DATA_DIR="${CAT_DATA_DIR:-}"
MAX_RESTARTS="${CAT_MAX_RESTARTS:-0}"
POLL_SECONDS="${CAT_POLL_SECONDS:-30}"
REMOTE_PYTHON="${CAT_REMOTE_PYTHON:-python3}"
DRY_RUN=0
TEARDOWN=0
EXTRA_ENV=()
TRAIN_ARGS=()

need_value() {
  [[ $# -ge 2 ]] || die "$1 needs a value"
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  # Accept --flag=value as well as --flag value (config overrides keep their own '=').
  if [[ $1 == --*=* && $1 != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    --name) NAME="$(need_value "$@")"; shift 2 ;;
    --zone) ZONE="$(need_value "$@")"; shift 2 ;;
    --project) PROJECT="$(need_value "$@")"; shift 2 ;;
    --type) TYPE="$(need_value "$@")"; shift 2 ;;
    --runtime) RUNTIME="$(need_value "$@")"; shift 2 ;;
    --spot) CAPACITY=spot; shift ;;
    --reserved) CAPACITY=reserved; shift ;;
    --on-demand) CAPACITY=on-demand; shift ;;
    --queued) QUEUED=1; shift ;;
    --repo) REPO="$(need_value "$@")"; shift 2 ;;
    --branch) BRANCH="$(need_value "$@")"; shift 2 ;;
    --workdir) WORKDIR="$(need_value "$@")"; shift 2 ;;
    --config) CONFIG="$(need_value "$@")"; shift 2 ;;
    --data-dir) DATA_DIR="$(need_value "$@")"; shift 2 ;;
    --env) EXTRA_ENV+=("$(need_value "$@")"); shift 2 ;;
    --max-restarts) MAX_RESTARTS="$(need_value "$@")"; shift 2 ;;
    --teardown) TEARDOWN=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*) TRAIN_ARGS+=("$1"); shift ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) die "unknown flag $1 (trainer flags go after --; see --help)" ;;
  esac
done

[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lowercase letters, digits and dashes: $NAME"
[[ -n $ZONE ]] || die "--zone (or TPU_ZONE) is required"
[[ -n $WORKDIR ]] || die "--workdir (or CAT_WORKDIR) is required"
# Every worker writes its checkpoint shards there and a recreated VM must find them: local disks do neither.
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path shared by all workers, got $WORKDIR"
[[ -z $DATA_DIR || $DATA_DIR == gs://* ]] || die "--data-dir must be a gs:// path, got $DATA_DIR"
[[ $CAPACITY =~ ^(spot|reserved|on-demand)$ ]] || die "TPU_CAPACITY must be spot, reserved or on-demand"
[[ $QUEUED =~ ^[01]$ ]] || die "TPU_QUEUED must be 0 or 1"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer"
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got $kv"
done

if [[ -z $RUNTIME ]]; then
  case "$TYPE" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default runtime for --type $TYPE; pass --runtime" ;;
  esac
fi

GFLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GFLAGS+=(--project="$PROJECT")
CAPACITY_FLAGS=()
[[ $CAPACITY == on-demand ]] || CAPACITY_FLAGS=(--"$CAPACITY")

if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI"
fi

# --- Command helpers -----------------------------------------------------------------------------------
# A word as the shell would need it typed: bare when safe, else single-quoted.
quote_word() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local words=() word
  for word in "$@"; do words+=("$(quote_word "$word")"); done
  printf '%s\n' "${words[*]}"
}

# Runs a command, or in --dry-run prints it (copy-pasteable) on stdout; everything else goes to stderr.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    "$@"
  fi
}

# Runs a shell command line on every worker of the slice.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all --command="$1"
}

# Sets STATE to the TPU's (or queued resource's) state, empty when it does not exist.
read_state() {
  local cmd
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" --format='value(state)')
  fi
  if ((DRY_RUN)); then
    quote_cmd "${cmd[@]}"
    STATE=""
  else
    # A missing resource is an error to gcloud and an empty state to us.
    STATE="$("${cmd[@]}" 2>/dev/null || true)"
  fi
}

# --- TPU lifecycle -------------------------------------------------------------------------------------
create_tpu() {
  log "creating $TYPE '$NAME' ($CAPACITY, runtime $RUNTIME)"
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GFLAGS[@]}" \
      --accelerator-type="$TYPE" --runtime-version="$RUNTIME" "${CAPACITY_FLAGS[@]+"${CAPACITY_FLAGS[@]}"}"
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GFLAGS[@]}" \
      --accelerator-type="$TYPE" --version="$RUNTIME" "${CAPACITY_FLAGS[@]+"${CAPACITY_FLAGS[@]}"}"
  fi
}

delete_tpu() {
  log "deleting '$NAME'"
  if ((QUEUED)); then
    # --force also deletes the TPU VM that the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" "${GFLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet
  fi
}

# Makes '$NAME' exist and be usable: reuse, wait for, or (re)create it.
ensure_tpu() {
  read_state
  while true; do
    case "$STATE" in
      READY | ACTIVE)
        log "'$NAME' is $STATE"
        return 0
        ;;
      "")
        create_tpu
        ((DRY_RUN)) && return 0
        ;;
      PREEMPTED | TERMINATED | STOPPED | FAILED | SUSPENDED)
        log "'$NAME' is $STATE: deleting and recreating it (training resumes from $WORKDIR)"
        delete_tpu
        create_tpu
        ;;
      *)
        # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, DELETING, SUSPENDING, REPAIRING, ...
        log "'$NAME' is $STATE; waiting ${POLL_SECONDS}s"
        sleep "$POLL_SECONDS"
        ;;
    esac
    read_state
  done
}

# --- Code and install ----------------------------------------------------------------------------------
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/cat_jax-$NAME.tar.gz"

cleanup() {
  local rc=$?
  ((DRY_RUN)) || rm -f "$TARBALL"
  if ((TEARDOWN)); then
    delete_tpu || rc=1
  fi
  exit "$rc"
}

copy_code() {
  if [[ -n $REPO ]]; then
    local repo branch
    repo="$(quote_word "$REPO")"
    branch="$(quote_word "$BRANCH")"
    log "cloning $REPO@$BRANCH on every worker"
    on_workers "if [ -d ~/cat_jax/.git ]; then git -C ~/cat_jax fetch --depth=1 origin $branch && git -C ~/cat_jax checkout --force FETCH_HEAD; else rm -rf ~/cat_jax && git clone --depth=1 --branch $branch $repo ~/cat_jax; fi"
  else
    log "copying $ROOT (tracked and untracked, not ignored files) to every worker"
    run bash -c "git -C $(quote_word "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(quote_word "$TARBALL") -C $(quote_word "$ROOT") --null -T -"
    run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:cat_jax.tar.gz" "${GFLAGS[@]}" --worker=all
    on_workers "rm -rf ~/cat_jax && mkdir -p ~/cat_jax && tar -xzf ~/cat_jax.tar.gz -C ~/cat_jax"
  fi
}

install_package() {
  log "installing cat_jax[tpu] on every worker"
  on_workers "cd ~/cat_jax && $REMOTE_PYTHON -m pip install --user --upgrade pip && $REMOTE_PYTHON -m pip install --user -e '.[tpu]'"
}

# --- Train ---------------------------------------------------------------------------------------------
# The trainer's environment: CAT_DISTRIBUTED=auto makes cat_jax.distributed call
# jax.distributed.initialize() on every worker (a GCE TPU VM keeps its worker list in metadata, not env).
train_command() {
  local env_words=(CAT_DISTRIBUTED=auto PYTHONUNBUFFERED=1)
  [[ -z $DATA_DIR ]] || env_words+=("TFDS_DATA_DIR=$DATA_DIR")
  env_words+=("${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}")
  local cmd=(env "${env_words[@]}" "$REMOTE_PYTHON" -m cat_jax.train --config "$CONFIG" --workdir "$WORKDIR")
  cmd+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  # A trainer left over from a dropped ssh session still holds the TPU: stop it (by its recorded pid)
  # before starting; then log to ~/cat_train.log as well as to this terminal.
  printf '%s' "cd ~/cat_jax && { if [ -f ~/cat_train.pid ] && kill -0 \"\$(cat ~/cat_train.pid)\" 2>/dev/null; then kill \"\$(cat ~/cat_train.pid)\"; sleep 10; fi; }; echo \$\$ > ~/cat_train.pid; exec > >(tee -a ~/cat_train.log) 2>&1; exec $(quote_cmd "${cmd[@]}")"
}

train() {
  log "training on every worker of '$NAME' (logs also in ~/cat_train.log on each worker)"
  on_workers "$(train_command)"
}

# --- Main ----------------------------------------------------------------------------------------------
trap cleanup EXIT
attempt=0
while true; do
  ensure_tpu
  copy_code
  install_package
  rc=0
  train || rc=$?
  if ((rc == 0)); then
    log "training finished; checkpoints in $WORKDIR"
    break
  fi
  read_state
  if [[ $STATE == READY || $STATE == ACTIVE ]]; then
    log "training failed (exit $rc) on a healthy TPU; not retrying"
    exit "$rc"
  fi
  if ((attempt >= MAX_RESTARTS)); then
    log "training stopped (exit $rc) and '$NAME' is ${STATE:-gone}; re-run this command to resume"
    exit "$rc"
  fi
  attempt=$((attempt + 1))
  log "'$NAME' is ${STATE:-gone} (preempted?); restart $attempt of $MAX_RESTARTS"
done
