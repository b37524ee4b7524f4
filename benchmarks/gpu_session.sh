#!/usr/bin/env bash
# Every GPU check of the open issues in one prepared script, for a lent GPU machine (no network;
# its image's python3 holds torch, triton, transformers). Carry the wheels of scripts/gpu_wheels.sh:
#
#   bash scripts/gpu_wheels.sh                                  # here, once: fills .whl/
#   # on the device (run tool, carry [".whl"]):
#   bash benchmarks/gpu_session.sh setup test kernels           # ~5-8 min (limits: 300+420+180+240 s)
#   bash benchmarks/gpu_session.sh setup policy train lerobot   # ~6 min
#   bash benchmarks/gpu_session.sh setup fit                    # ~4 min (the π0 memory check)
#
# Stages (in the order given; each under its own time limit, logged to $OUT/<stage>.log):
#   setup    install the carried wheels (--no-index --no-deps) and build flowkernels' CUDA extension
#   test     pytest -m gpu (Triton kernels compiled, CUDA kernels, the policy on the GPU)
#   kernels  the stages ops then attention (each has its own limit; `ops` or `attention` runs one)
#   ops      bench_ops.py, GPU defaults: 6 ops x B 1,64,256,1024, bf16, eager + the kernels (cuda,
#            triton), then torch.compile last (its 24 compiles are most of the time); L2 flushed
#            before every timed call; ~1.5-2.5 min
#   attention  bench_attention.py, GPU defaults: bf16, P 816, fwd and fwdbwd, N 1,8, B·N 256,1024
#            (8 shapes) x 7 providers (sdpa_dense, sdpa_clone, triton, triton_split, grouped,
#            sdpa_expand, then flex, which compiles per shape, after all the others), 0.25 s per
#            measurement; ~2-4 min
#   policy   bench_policy.py (small and pi0 configs)
#   train    bench_train.py --model small (bf16), and short trainer runs with bf16=auto:
#            fpo at ZeRO 1 and 2, sft then vla_fpo from its checkpoint
#   lerobot  bench_lerobot.py --sizes small (lerobot from the carried wheel)
#   fit      one iteration of the trainer with the full π0 (VLM frozen, ZeRO-2, bf16) at LIBERO's batch sizes
#            on the reach task, FPO then Flow-Noise PPO: the peak CUDA memory of issue 5's 80 GB criterion
# Benchmarks append to benchmarks/RESULTS.md as usual, each run its own dated block, row by row as
# measured (a stage cut by its limit keeps the rows it measured); the file is copied to $OUT at the
# end (the device keeps nothing), with a summary of every stage's exit status printed last.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the scripts here (slow, no CUDA build: skip setup)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
declare -a SUMMARY=()

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  # after every stage, not only at the end: the run tool's own limit may stop the whole script
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  printf '%s\n' "${SUMMARY[@]}" >"$OUT/summary.txt"
}

do_setup() {
  stage setup 300 "
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c 'import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)'
    if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps .whl/*.whl; else echo 'no .whl/: DeepSpeed and lerobot missing'; fi
    MAX_JOBS=16 FLOWKERNELS_BUILD_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e . &&
    $PY -c 'import flowkernels, deepspeed; print(\"flowkernels\", flowkernels.__file__, \"deepspeed\", deepspeed.__version__)'"
}
do_test() {
  stage test 420 "$PY -m pytest -q -m gpu -p no:cacheprovider tests -rs"
}
do_ops() {
  stage ops 180 "$PY benchmarks/bench_ops.py --device $DEVICE"
}
do_attention() {
  stage attention 240 "$PY benchmarks/bench_attention.py --device $DEVICE"
}
do_kernels() {
  do_ops
  do_attention
}
do_policy() {
  stage policy 300 "$PY benchmarks/bench_policy.py --device $DEVICE"
}
do_train() {
  local common="tensorboard=false plot=false iterations=2 sft_iterations=2 eval_episodes=64 checkpoint_every=2"
  stage train 540 "
    $PY benchmarks/bench_train.py --device $DEVICE --model small --dtype bfloat16 --out benchmarks/RESULTS.md &&
    $PY flowrl/train.py --config flowrl/configs/reach_fpo.yaml $common run_dir=$OUT/fpo_z1 zero_stage=1 &&
    $PY flowrl/train.py --config flowrl/configs/reach_fpo.yaml $common run_dir=$OUT/fpo_z2 zero_stage=2 &&
    $PY flowrl/train.py --config flowrl/configs/reach_sft.yaml $common run_dir=$OUT/sft iterations=0 sft_iterations=2 &&
    $PY flowrl/train.py --config flowrl/configs/reach_vla_fpo.yaml $common sft_iterations=0 run_dir=$OUT/vla zero_stage=2 \
      model.init_from=\$(ls -d $OUT/sft/checkpoints/iter_* | tail -1) &&
    rm -rf $OUT/*/checkpoints"
}
do_fit() {  # issue 5: the π0 config that trains the action expert and critic (VLM frozen) in one GPU with ZeRO-2
  # the full π0 (3.24 B parameters, 317 M trained) on the reach task at LIBERO's batch sizes: 64 envs, H 50, H' 5,
  # K 4, 16 chunks per rollout, minibatch 64 (FPO: 8 pairs each, 512 rows); one camera at 224² (LIBERO's π0 has
  # two); the iteration's peak CUDA memory (peak_mem_gb) from metrics.jsonl. FIT_MODEL=tiny: a dry run of the stage
  local fit="model.config=${FIT_MODEL:-pi0} model.freeze=expert_only model.overrides.action_horizon=50"
  fit+=" env.image_size=224 env.chunk_steps=5 env.max_episode_steps=80 env.num_envs=64 algo.rollout_chunks=16"
  fit+=" algo.epochs=1 algo.minibatch_size=64 algo.fpo_pairs=8 algo.num_steps=4 zero_stage=2 bf16=true"
  fit+=" sft_iterations=0 iterations=1 eval_episodes=0 checkpoint_every=0 tensorboard=false plot=false progress=false"
  fit+=" ${FIT_EXTRA:-}"  # more overrides (a CPU dry run: FIT_MODEL=tiny FIT_EXTRA="env.image_size=32 env.num_envs=4 ...")
  stage fit 420 "
    for a in fpo flow_noise_ppo; do
      $PY flowrl/train.py --config flowrl/configs/reach_\$a.yaml $fit run_dir=$OUT/fit_\$a &&
      $PY -c \"import json, sys; m = json.loads(open(sys.argv[1]).readlines()[-1]); print(sys.argv[2], 'π0 ZeRO-2 bf16:',
        'peak_mem_gb', m.get('peak_mem_gb'), 'rollout_s', round(m['rollout_s'], 1), 'update_s', round(m['update_s'], 1))\" \\
        $OUT/fit_\$a/metrics.jsonl \$a || exit 1
    done"
}
do_lerobot() {
  stage lerobot 420 "$PY benchmarks/bench_lerobot.py --device $DEVICE --sizes small --batches 1,8,64"
}

[ $# -eq 0 ] && set -- setup test kernels policy train fit lerobot
for s in "$@"; do
  case $s in
    setup | test | kernels | ops | attention | policy | train | fit | lerobot) "do_$s" ;;
    *) echo "unknown stage $s (setup test kernels ops attention policy train fit lerobot)" >&2; exit 2 ;;
  esac
done
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
echo "=== summary (logs in \$OUT)"
printf '%s\n' "${SUMMARY[@]}"
