#!/usr/bin/env bash
# Everything GPU-side in one call on a machine with two GPUs (kind nvidia-h200-x2), within LIMIT_S seconds:
#   MOBALAB_COMMIT=<commit> LIMIT_S=580 bash scripts/gpu_two.sh
# 1. context parallelism on both GPUs (scripts/gpu_cp.sh, CP_BUDGET_S of the time; meanwhile the CPUs build the
#    FlashMoBA peer when its bundle was carried in .peers/);
# 2. then two lanes at once until the deadline (scripts/gpu_check.sh with GPU_CHECK_DEADLINE):
#    GPU 0, timed work one step at a time:      $LANE0 (default: dims hf decode peers)
#    GPU 1: $LANE1 (default: wgmma tests-core rope tiles-ncu decode-ncu) and, at the same time, $LANE2 (default:
#    trained-test; the tests and the training share the GPU, the profiles come after the tests)
# CP_BUDGET_S=0 skips step 1 (and the first look): the lanes only.
# Every log and archive is packed into $OUT/all.tgz (the device returns at most 8 files); summaries print last.
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
T0=$(date +%s)
LIMIT=${LIMIT_S:-580}
DEADLINE=$(( T0 + LIMIT - 15 ))  # time to pack and print
LANE0=${LANE0:-dims hf decode peers}
LANE1=${LANE1:-wgmma tests-core rope tiles-ncu decode-ncu}
LANE2=${LANE2:-trained-test}
mkdir -p "$OUT"

if [ -f .peers/flash-moba/fm_bundle.tgz ] && [ -f scripts/build_flash_moba.sh ]; then
  (MAX_JOBS=16 timeout 200 bash scripts/build_flash_moba.sh > "$OUT/fm_build.txt" 2>&1; echo "build rc $?" >> "$OUT/fm_build.txt") &
fi
if [ "${CP_BUDGET_S:-240}" = "0" ]; then  # lanes only: no first look, no context parallelism
  echo "lanes only (CP_BUDGET_S=0)" > "$OUT/lanes.txt"
else
# A first look at the forward with its default (16-bit) partials: if its GPU tests fail, everything after runs
# with the fp32 partials (MOBALAB_ATTN_PARTIAL=fp32), so the timings are of a correct forward either way.
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m pytest -m gpu -q -x -p no:cacheprovider -o addopts="" \
  --import-mode=importlib tests/kernels/test_attention_gpu.py -k "matches_oracle and d128 and auto" \
  > "$OUT/first_look.txt" 2>&1
rc=$?
if [ "$rc" -eq 1 ]; then export MOBALAB_ATTN_PARTIAL=fp32; fi  # 1: tests failed (not a time-out or a crash)
echo "first look (rc $rc): $(tail -n 1 "$OUT/first_look.txt"); MOBALAB_ATTN_PARTIAL=${MOBALAB_ATTN_PARTIAL:-16bit}, \
$(( $(date +%s) - T0 )) s" > "$OUT/lanes.txt"
CP_BUDGET_S=${CP_BUDGET_S:-240} bash scripts/gpu_cp.sh > "$OUT/cp.txt" 2>&1
echo "cp: $(( $(date +%s) - T0 )) s" >> "$OUT/lanes.txt"
fi
wait  # the peer build, if it is still going

# shellcheck disable=SC2086
(CUDA_VISIBLE_DEVICES=1 GPU_CHECK_NAME=g1 GPU_CHECK_DEADLINE=$DEADLINE bash scripts/gpu_check.sh $LANE1 \
   > "$OUT/g1.txt" 2>&1) &
# shellcheck disable=SC2086
(CUDA_VISIBLE_DEVICES=1 GPU_CHECK_NAME=g2 GPU_CHECK_DEADLINE=$DEADLINE bash scripts/gpu_check.sh $LANE2 \
   > "$OUT/g2.txt" 2>&1) &
# shellcheck disable=SC2086
CUDA_VISIBLE_DEVICES=0 GPU_CHECK_NAME=g0 GPU_CHECK_DEADLINE=$DEADLINE bash scripts/gpu_check.sh $LANE0 \
  > "$OUT/g0.txt" 2>&1
wait
echo "lanes: $(( $(date +%s) - T0 )) s" >> "$OUT/lanes.txt"

(cd "$OUT" && tar czf all.tgz --exclude=all.tgz ./* && find . -mindepth 1 ! -name all.tgz -exec rm -rf {} + 2>/dev/null)
tar xzf "$OUT/all.tgz" -C /tmp 2>/dev/null; cd /tmp || exit 1
echo "================ two-GPU run ================"
cat lanes.txt
[ -f fm_build.txt ] && tail -n 3 fm_build.txt
for f in cp.txt g0.txt g1.txt g2.txt; do
  [ -f "$f" ] && { echo "======== $f"; sed -n '/================ summary/,$p' "$f" | cut -c1-400 | tail -n 70; }
done
