#!/usr/bin/env bash
# Everything mobalab needs a GPU for, in one call on the device machine (records go to RESULTS.md).
#   MOBALAB_COMMIT=<commit> bash scripts/gpu_check.sh [STEP ...]      default: tests fwd bwd-targets mc snr
# (MOBALAB_COMMIT names the commit of the copied working tree, whose git metadata may be stale)
# Steps:
#   tests        pytest -m gpu over every test file that holds GPU tests
#   fwd | fwd-quick          forward benchmark vs FA2 / cuDNN (full sweep | a few configurations)
#   bwd-targets | bwd-quick  forward+backward benchmark at the issue's target sizes (64K, 512K) | smoke sizes;
#                            BWD_PEERS="flashmoba" adds FlashMoBA at both target sizes (built first:
#                            build_flash_moba.sh); BENCH_BUILD_OPTIONS="topk_wgmma.cu:MOBA_TOPK_WG_STEP_DESC=0 ..."
#                            builds mobalab's kernels with those options (the benchmark's --build-option)
#   host-profile the host's time per step and the GPU's idle gaps in one step at 16K and 8K (scripts/profile_host.py;
#                host/ holds the cProfile tables)
#   host-waits   where the GPU waits for the host, launch by launch, and the host's path call by call, at 64K, 16K
#                and 8K (scripts/profile_host.py --launches-only --calls; host/launches_N.txt, host/calls_N.txt; ~40 s)
#   tree-ab      this tree's training step against TREE_AB_BASE (another tree's src directory, carried), interleaved
#                in alternating processes at 8K, 16K, 64K and 8 x 2K, TREE_AB_ROUNDS (4) rounds (scripts/tree_ab.py;
#                tree_ab.md; ~110 s)
#   pairs-ab     this tree's pair-list launches against PAIRS_AB_BASE (another tree's src directory, carried), or
#                with PAIRS_AB_TILES (e.g. "narrow,radix") two $MOBALAB_PAIR_TILES forms of this tree, per chunk of
#                the forward at 64K and 512K, in alternating processes, the lists checked against the stable sort
#                (scripts/pairs_ab.py; pairs_ab.md; ~75 s)
#   bwd-ab       backward main-kernel variants and build options timed side by side at 8K / 16K / 64K
#                (scripts/bwd_variants_ab.py; BWD_AB_VARIANTS, default "block block+MOBA_BWD_DQ_UNROLL=1"; BWD_AB_POINTS,
#                default "8K 16K 64K", also 512K; bwd_ab.md)
#   bwd-graph    the CUDA-graph GPU test of a step, then the forward+backward benchmark at 64K / 16K / 8K with each
#                step also replayed from a CUDA graph and issued back to back (mobalab, FA2, cuDNN alike: no host
#                time | the host ahead as in a training loop; bwd-graph/)
#   bwd-queued   the forward+backward benchmark at 512K (BWD_QUEUED_SELECT, default 1: the --select index) with each
#                step also issued back to back on every side (the dense peers' steps take 15-25 s: ~3 min; bwd-queued/)
#   mc           Monte Carlo throughput        snr    the snr-vs-accuracy experiment, full configuration
#   decode-ab                the split decode step's variants and build options side by side (scripts/decode_split_ab.py;
#                            DECODE_AB_POINTS, DECODE_AB_VARIANTS, default the 32-token attention build at eight points;
#                            decode_ab.log, ~60 s)
#   decode-trace             per-CTA trace of the split decode step (scripts/decode_attn_trace.py;
#                            DECODE_TRACE_POINTS, DECODE_TRACE_VARIANTS, default 512K and 128K B 64 k 4 with the
#                            no-copies probe; decode_trace.log, raw traces in decode_trace/, ~40 s)
#   decode | decode-full     MoBA decode step vs dense SDPA decode (quick subset with the targets | full sweep),
#                            both decode kernels (fused, split: two rows per configuration)
#   varlen       packed variable-length batches vs an equal-length batch, transformers step times (quick)
#   trained-test the GPU tests of the trained-model recipe (three small models trained at 4K, ~160 s)
#   trained-study            train variants of the trained-routing study (scripts/train_variants.py with
#                            TRAIN_VARIANTS, e.g. "dense:0-2,moba-128-kconv3:1-2"); CSVs under trained/
#   decode-tests             only the GPU tests of MoBA decode (tests/kernels/test_decode_gpu.py)
#   decode-paged             the paged KV cache: its GPU test (equal to a contiguous cache), then the split
#                            step over pages of 128 and 1024 tokens against the contiguous cache, interleaved, at 512K,
#                            128K, 32K, batch 8 (scripts/decode_split_ab.py; logs/decode_paged_ab.log; ~150 s)
#   wgmma        only the GPU test of the Hopper wgmma probe (tests/kernels/test_wgmma_probe_gpu.py, ~15 s)
#   wgmma-tile   the wgmma forward tile kernels (wgmma, warp-specialised wgmma-ws): probe (incl. transposed B) and
#                oracle GPU tests (wgmma-ws's in a run of their own, pytest_wgmma_ws.log), then the quick forward
#                benchmark with --variant wgmma-ws and wgmma (bench_wgmma_ws.log, bench_wgmma.log; tables in
#                wgmma-ws/ and wgmma/bench_table.md; ~200 s)
#   router-wgmma the wgmma router: its GPU routing tests (-k wgmma: both variants' sweeps with wgmma as default, wgmma
#                vs mma selections), then the top-k kernel of both variants at 8K and 64K (router/router_table.md; ~150 s)
#   router-split the split router (the default top-k kernel): its GPU routing tests (-k split: the sweeps with split as
#                default, split vs mma selections, exactly equal), then the top-k kernel of every variant at 8K and 64K
#                (router/router_table.md; ~150 s)
#   router-sass  Nsight Compute source counters (SASS, executed instructions, stall samples per instruction) of the
#                router's top-k kernel in one forward at 64K (ROUTER_SASS_ARGS adds profile_tiles.py arguments):
#                logs/router_sass.csv, its opcode classes and busiest straight-line runs logs/router_sass.md (~60 s)
#   fwd-sass     the same for the forward's tile kernel (the first launch of moba_attn_res / moba_attn_wg* in one
#                forward at 64K; FWD_SASS_ARGS adds profile_tiles.py arguments): logs/fwd_sass.csv, logs/fwd_sass.md
#   router-ab    the top-k kernels of this tree against ROUTER_AB_BASE (another tree's src directory, carried), in
#                alternating processes, ROUTER_AB_ROUNDS (2) rounds at ROUTER_AB_LENGTHS (8192,16384,65536), block size
#                ROUTER_BLOCK (128), head dim ROUTER_HEAD_DIM (128), variants ROUTER_AB_VARIANTS (mma,wgmma)
#   router-bench only that benchmark of the top-k kernel variants (the tests run in tests-core; ~60 s);
#                ROUTER_BLOCK=<B> times them at block size B (default 128), ROUTER_VARIANTS=<a,b> names the variants
#                (each optionally +NAME=VALUE build options), ROUTER_LENGTHS=<n,m> the lengths (default 8192,65536)
#   tests-core   the GPU tests of the attention kernels (routing, forward, backward, varlen, decode, transformers)
#   pairs        only the GPU tests of the counting-sort pair lists (tests/kernels/test_pairs_gpu.py: exact lists,
#                bit-identical attention vs the torch sort, index building and forward at 64K timed, ~60 s)
#   tiles-ncu    Nsight Compute over one forward + backward at 64K (B 128, k 8, d 128): per-kernel rates, stalls;
#                TILES_NCU_ARGS adds arguments of scripts/profile_tiles.py (e.g. "--block-size 32 --forward-only")
#   fwd-ab       forward tile-kernel build options side by side (scripts/fwd_variants_ab.py; FWD_AB_VARIANTS, default
#                "base MOBA_FWD_MINB_SMALL_KT=0+MOBA_FWD_ROLLED_GATHER=0" (the small-block resident kernel as it was);
#                FWD_AB_POINTS, default "8K 64K 64K-B32"; FWD_AB_TOPK, default 8; FWD_AB_KV_HEADS,
#                default 16; fwd_ab.md)
#   tiles-ncu-ws the same profile with the warp-specialised wgmma forward tile kernel (MOBALAB_ATTN_VARIANT=wgmma-ws)
#   tiles-ncu-peer the same profile of FlashMoBA's step on the same inputs (built first when it does not import,
#                ~100 s; the bundle must be carried in .peers/flash-moba/)
#   rope         the rope experiment, full configuration (vector leg and the CUDA router on RoPE'd inputs)
#   decode-ncu               Nsight Compute on one decode step kernel (512K and 32K, batch 8, B 128, k 8): reports
#                            under logs/decode-ncu, summary table (duration, DRAM %, GB/s, occupancy, stalls)
#   decode-split-ncu         the same for the split decode path (routing and attention launch of one step, ~100 s)
#   decode-sass              Nsight Compute source counters (SASS, executed instructions and stall samples per
#                            instruction) of the split attention launch at 512K, batch 8: logs/decode_sass.csv
#   dims         speed per head dim 32..256 vs 128, forward and forward+backward, 64K, mobalab only (~60 s)
#   hf-generate  MobaCache's GPU test, then ms per generated token of the tiny Llama after 32K / 128K prompts: MoBA
#                with MobaCache, MoBA with the dynamic cache, SDPA (hf-generate/generation.md; ~250 s)
#   hf           transformers training step only, tiny Llama, MoBA vs sdpa at 32K and 128K (~60 s)
#   bwd-sass     Nsight Compute source counters (SASS, executed instructions, stall samples per instruction) of the
#                main backward kernel at 16K, mobalab's and FlashMoBA's (built first when it does not import):
#                logs/bwd_sass.csv, logs/bwd_sass_flash_moba.csv (summed by opcode with scripts/sass_summary.py);
#                BWD_SASS_PEER=0 profiles mobalab's only, BWD_SASS_LEN=65536 another length
#   bwd-block    the "block" backward variant (MOBALAB_BWD_VARIANT=block): its GPU tests, scripts/bwd_variants_ab.py
#                (interleaved timing against "tile" at 8K-64K: logs/bwd_variants_ab.md), the forward+backward
#                benchmark at 64K / 16K / 8K with it (logs/bwd_block/) and its source counters at 16K
#                (logs/bwd_sass_block.csv); ~250 s
#   bwd-step     the backward's list and order settings over a whole step: the GPU tests of the kept / gathered
#                lists (-k kept), then scripts/bwd_step_ab.py --compare lists and --compare order (interleaved,
#                8K-64K: logs/bwd_step_lists.md, logs/bwd_step_order.md); ~200 s
#   step-ab      whole steps, interleaved, 8K-64K: scripts/bwd_step_ab.py --compare C for each C in $STEP_AB
#                (default "plan tpc": the chunk planner, the forward's tiles per CTA; logs/step_ab_C.md; ~100 s each)
#   peers        mobalab vs FlexAttention (MoBA block mask) and FlashMoBA, 8K and 64K, fwd and fwd+bwd, the
#                steps from an idle GPU and back to back (~130 s);
#                FlashMoBA shows n/a unless scripts/build_flash_moba.sh ran first on the machine (~100 s build)
# (the full forward+backward sweep is scripts/gpu_backward.sh; the full experiments scripts/gpu_experiments.sh)
# Logs and CSVs are packed into $OUT/<name>.tgz (8 files come back from the device); a summary prints last.
# GPU_CHECK_NAME=<name> (default gpu_check) names the logs folder and the archive, so that two checks can run at
# once on two GPUs of one machine (each with its own CUDA_VISIBLE_DEVICES).
set -uo pipefail
source "$(dirname "$0")/_gpu_env.sh"
NAME="${GPU_CHECK_NAME:-gpu_check}"
# GPU_CHECK_DEADLINE=<epoch seconds>: steps are cut to end 10 s before it and skipped when under 25 s remain,
# so the logs are always packed and the summary printed within a caller's time limit.
DEADLINE="${GPU_CHECK_DEADLINE:-0}"
cap() {  # a step's time limit: its own, or what is left before the deadline
  local left
  if [ "$DEADLINE" -gt 0 ]; then
    left=$(( DEADLINE - $(date +%s) - 10 ))
    if [ "$left" -lt "$1" ]; then echo $(( left > 1 ? left : 1 )); return; fi
  fi
  echo "$1"
}
W="$OUT/$NAME.logs"
mkdir -p "$W"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests fwd bwd-targets mc snr)
status=0

{
  echo "date: $(date -u +%F' '%T) UTC   commit: ${MOBALAB_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'see the calling record')}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, cupy; print('torch', torch.__version__, '| cupy', cupy.__version__, '| cuda', torch.version.cuda)"
} 2>&1 | tee "$W/env.txt"

tiles_ncu() {  # tiles_ncu NAME [ARGS]: Nsight Compute over scripts/profile_tiles.py ARGS into $W/NAME.ncu-rep and its table
  local name="$1"; shift
  timeout "$(cap 240)" ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
    --metrics "$(python3 -c 'from mobalab.bench._ncu import NCU_METRICS as M, TENSOR_METRIC as T, TILE_METRICS as X; print(",".join((*M, T, *X)))')" \
    -f -o "$W/$name" python3 scripts/profile_tiles.py "$@" > "$W/${name}_ncu.log" 2>&1 \
  && python3 scripts/ncu_summary.py "$W/$name.ncu-rep" > "$W/${name}_ncu_table.md" 2>> "$W/${name}_ncu.log"
}

kernel_sass() {  # kernel_sass NAME KERNEL [ARGS]: SourceCounters of the first launch of KERNEL in one run of
                 # scripts/profile_tiles.py ARGS -> $W/NAME.csv, its details and its opcode / straight-line-run summary
  local name="$1" kernel="$2"; shift 2
  timeout "$(cap 150)" ncu --clock-control none --nvtx --nvtx-include "profile/" --kernel-name "$kernel" \
    --launch-count 1 --section SourceCounters --section WarpStateStats --section SpeedOfLight --section Occupancy \
    -f -o "$W/$name" python3 scripts/profile_tiles.py "$@" > "$W/$name.log" 2>&1 \
  && ncu --import "$W/$name.ncu-rep" --page source --csv --print-source sass > "$W/$name.csv" 2>> "$W/$name.log" \
  && ncu --import "$W/$name.ncu-rep" --page details > "$W/${name}_details.txt" 2>> "$W/$name.log" \
  && python3 scripts/sass_summary.py "$W/$name.csv" --blocks 20 > "$W/$name.md" 2>> "$W/$name.log"
}

bwd_sass() {  # bwd_sass NAME IMPL KERNEL: kernel_sass of KERNEL in one step (forward + backward) of IMPL at 16K
             # (BWD_SASS_LEN: another length)
  kernel_sass "$1" "$3" --impl "$2" --seq-len "${BWD_SASS_LEN:-16384}"
}

build_option_args() {  # --build-option SOURCE.cu:MOBA_NAME=VALUE for every word of BENCH_BUILD_OPTIONS
  local o
  for o in ${BENCH_BUILD_OPTIONS:-}; do printf -- '--build-option %s ' "$o"; done
}

bench_router() {  # bench_router LIMIT: the router variants side by side (scripts/bench_router.py) into $W/router
  timeout "$(cap "$1")" python3 scripts/bench_router.py --lengths "${ROUTER_LENGTHS:-8192,65536}" \
    --block-size "${ROUTER_BLOCK:-128}" \
    ${ROUTER_VARIANTS:+--variants "$ROUTER_VARIANTS"} --out "$W/router" > "$W/bench_router.log" 2>&1
}

router_tests() {  # router_tests VARIANT: the routing GPU tests of one router variant (-k VARIANT), with statistics
  ROUTING_STATS_FILE="$W/router_stats.txt" timeout "$(cap 150)" python3 -m pytest -m gpu -q -p no:cacheprovider \
    -o addopts="" --import-mode=importlib -k "$1" tests/kernels/test_routing_gpu.py > "$W/pytest_router_$1.log" 2>&1
}

for step in "${STEPS[@]}"; do
  start=$(date +%s)
  if [ "$DEADLINE" -gt 0 ] && [ $(( DEADLINE - start )) -lt 25 ]; then
    echo "$step: skipped (deadline)" | tee -a "$W/steps.txt"; status=1; continue
  fi
  case "$step" in
    tests)
      # only the files that hold GPU tests: the others import test-only packages (hypothesis) the image may lack
      gpu_tests=$(grep -rl "pytest.mark.gpu" tests | sort)
      timeout $(cap 330) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
        $gpu_tests > "$W/pytest_gpu.log" 2>&1 || status=1 ;;
    fwd)       timeout $(cap 300) python3 -m mobalab.bench.attention --out "$W/fwd" > "$W/bench_fwd.log" 2>&1 || status=1 ;;
    fwd-quick) timeout $(cap 200) python3 -m mobalab.bench.attention --quick --out "$W/fwd" > "$W/bench_fwd.log" 2>&1 || status=1 ;;
    bwd-targets) # shellcheck disable=SC2086  # BWD_PEERS (e.g. flashmoba) adds those peers; BENCH_BUILD_OPTIONS are words
                 timeout $(cap 360) python3 -m mobalab.bench.attention --backward --select 0,1 \
                   ${BWD_PEERS:+--peers $BWD_PEERS} $(build_option_args) --out "$W/bwd" > "$W/bench_bwd.log" 2>&1 \
                   || status=1 ;;
    host-waits) timeout $(cap 120) python3 scripts/profile_host.py --seq-len 65536 16384 8192 --steps 15 \
                  --launches-only --calls --out "$W/host" > "$W/host_waits.log" 2>&1 || status=1 ;;
    tree-ab) timeout $(cap 300) python3 scripts/tree_ab.py "${TREE_AB_BASE:?TREE_AB_BASE names the other src}" \
               --points 8K 16K 64K 8x2K --rounds "${TREE_AB_ROUNDS:-4}" > "$W/tree_ab.md" 2> "$W/tree_ab.log" || status=1 ;;
    pairs-ab) if [ -n "${PAIRS_AB_TILES:-}" ]; then pairs_what=(--tiles-ab "$PAIRS_AB_TILES")
              else pairs_what=("${PAIRS_AB_BASE:?PAIRS_AB_BASE (or PAIRS_AB_TILES) names what to compare}"); fi
              timeout $(cap 200) python3 scripts/pairs_ab.py "${pairs_what[@]}" \
                --rounds 3 --reps 30 > "$W/pairs_ab.md" 2> "$W/pairs_ab.log" || status=1 ;;
    host-profile) timeout $(cap 120) python3 scripts/profile_host.py --seq-len 16384 8192 --out "$W/host" \
                    > "$W/host_profile.log" 2>&1 || status=1 ;;
    bwd-ab) # shellcheck disable=SC2086  # the variants are words
            timeout $(cap 420) python3 scripts/bwd_variants_ab.py --points ${BWD_AB_POINTS:-8K 16K 64K} \
              --variants ${BWD_AB_VARIANTS:-block block+MOBA_BWD_DQ_UNROLL=1} > "$W/bwd_ab.md" 2>&1 || status=1 ;;
    bwd-graph) timeout $(cap 120) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                 tests/kernels/test_backward_gpu.py -k cuda_graph > "$W/pytest_bwd_graph.log" 2>&1 || status=1
               timeout $(cap 300) python3 -m mobalab.bench.attention --backward --select 0,5,6 --graph --queued \
                 --out "$W/bwd-graph" > "$W/bench_bwd_graph.log" 2>&1 || status=1 ;;
    bwd-queued) timeout $(cap 420) python3 -m mobalab.bench.attention --backward --select "${BWD_QUEUED_SELECT:-1}" \
                  --queued --out "$W/bwd-queued" > "$W/bench_bwd_queued.log" 2>&1 || status=1 ;;
    bwd-quick) timeout $(cap 200) python3 -m mobalab.bench.attention --backward --quick --out "$W/bwd" \
                 > "$W/bench_bwd.log" 2>&1 || status=1 ;;
    mc)  timeout $(cap 120) python3 -m mobalab.bench.monte_carlo --min-seconds 1 --csv "$W/mc_throughput.csv" \
           > "$W/mc_throughput.log" 2>&1 || status=1 ;;
    snr) timeout $(cap 180) python3 -m mobalab.cli run snr-vs-accuracy --no-progress --out "$W/snr-vs-accuracy" \
           > "$W/snr-vs-accuracy.log" 2>&1 || status=1 ;;
    # wgmma-ws (mbarrier pipeline) in runs of its own after wgmma's; its benchmark is skipped if its tests hung
    wgmma-tile) timeout $(cap 120) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                  tests/kernels/test_wgmma_probe_gpu.py tests/kernels/test_attention_wgmma_gpu.py -k "not ws" \
                  > "$W/pytest_wgmma_tile.log" 2>&1 || status=1
                timeout $(cap 90) python3 -m mobalab.bench.attention --quick --variant wgmma --out "$W/wgmma" \
                  > "$W/bench_wgmma.log" 2>&1 || status=1
                ws_rc=0
                timeout $(cap 120) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                  tests/kernels/test_attention_wgmma_gpu.py -k ws > "$W/pytest_wgmma_ws.log" 2>&1 || { ws_rc=$?; status=1; }
                if [ "$ws_rc" -ne 124 ]; then
                  timeout $(cap 90) python3 -m mobalab.bench.attention --quick --variant wgmma-ws --out "$W/wgmma-ws" \
                    > "$W/bench_wgmma_ws.log" 2>&1 || status=1
                fi ;;
    router-wgmma|router-split) router_tests "${step#router-}" || status=1; bench_router 60 || status=1 ;;
    router-bench) bench_router 90 || status=1 ;;
    router-ab)
      for round in $(seq "${ROUTER_AB_ROUNDS:-2}"); do
        for tree in base this; do
          if [ "$tree" = base ]; then src="${ROUTER_AB_BASE:?ROUTER_AB_BASE names the other src}"; else src="$PWD/src"; fi
          PYTHONPATH="$src" timeout "$(cap 120)" python3 scripts/bench_router.py --lengths "${ROUTER_AB_LENGTHS:-8192,16384,65536}" \
            --block-size "${ROUTER_BLOCK:-128}" --head-dim "${ROUTER_HEAD_DIM:-128}" --variants "${ROUTER_AB_VARIANTS:-mma,wgmma}" \
            --out "$W/router_ab/${tree}_$round" \
            > "$W/router_ab_${tree}_$round.log" 2>&1 || status=1
        done
      done ;;
    router-sass) # shellcheck disable=SC2086  # ROUTER_SASS_ARGS are words
      kernel_sass router_sass 'regex:moba_topk' --forward-only ${ROUTER_SASS_ARGS:-} || status=1 ;;
    fwd-sass) # shellcheck disable=SC2086  # FWD_SASS_ARGS are words
      kernel_sass fwd_sass 'regex:moba_attn_(res|wg)' --forward-only ${FWD_SASS_ARGS:-} || status=1 ;;
    tests-core) timeout $(cap 400) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                  tests/kernels/test_routing_gpu.py tests/kernels/test_attention_gpu.py tests/kernels/test_backward_gpu.py \
                  tests/kernels/test_varlen_gpu.py tests/kernels/test_decode_gpu.py tests/integrations/test_transformers_gpu.py \
                  tests/experiments/test_rope.py tests/kernels/test_training_gpu.py tests/kernels/test_pairs_gpu.py \
                  > "$W/pytest_gpu.log" 2>&1 || status=1 ;;
    pairs) timeout $(cap 120) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
             tests/kernels/test_pairs_gpu.py > "$W/pytest_pairs.log" 2>&1 || status=1 ;;
    trained-test) timeout $(cap 240) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
                    --import-mode=importlib tests/training/test_training_gpu.py > "$W/pytest_trained.log" 2>&1 || status=1 ;;
    trained-study) timeout $(cap 590) python3 scripts/train_variants.py --variants "${TRAIN_VARIANTS:?}" --device cuda \
                     --out "$W/trained" > "$W/trained_study.log" 2>&1 || status=1 ;;
    decode-tests) timeout $(cap 300) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                   tests/kernels/test_decode_gpu.py > "$W/pytest_gpu.log" 2>&1 || status=1 ;;
    wgmma) timeout $(cap 90) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
             tests/kernels/test_wgmma_probe_gpu.py > "$W/pytest_wgmma.log" 2>&1 || status=1 ;;
    decode-paged) timeout $(cap 150) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                   tests/kernels/test_decode_gpu.py -k paged > "$W/pytest_decode_paged.log" 2>&1 || status=1
                 timeout $(cap 150) python3 scripts/decode_split_ab.py --points 512K,128K,32K \
                   --variants page_size=128 page_size=1024 > "$W/decode_paged_ab.log" 2>&1 || status=1 ;;
    decode-ab) timeout $(cap 240) python3 scripts/decode_split_ab.py \
                 --points "${DECODE_AB_POINTS:-512K,1M,128K,128K-B64k4,128K-B32k8,128K-k16,32K,32K-b64}" \
                 --variants ${DECODE_AB_VARIANTS:-attn_chunk=32,attn_stages=2} > "$W/decode_ab.log" 2>&1 || status=1 ;;
    decode-trace) timeout $(cap 150) python3 scripts/decode_attn_trace.py \
                 --points "${DECODE_TRACE_POINTS:-512K,128K-B64k4}" \
                 --variants ${DECODE_TRACE_VARIANTS:-probe=2} --dump "$W/decode_trace" > "$W/decode_trace.log" 2>&1 \
                   || status=1 ;;
    decode)      timeout $(cap 150) python3 -m mobalab.bench.decode --quick --out "$W/decode" > "$W/bench_decode.log" 2>&1 \
                   || status=1 ;;
    decode-ncu)  timeout $(cap 150) python3 -m mobalab.bench.decode --ncu "$W/decode-ncu" > "$W/decode_ncu.log" 2>&1 || status=1 ;;
    decode-split-ncu) timeout $(cap 150) python3 -m mobalab.bench.decode --ncu "$W/decode-ncu" --kernel split \
                   > "$W/decode_split_ncu.log" 2>&1 || status=1 ;;
    decode-sass) # per-instruction counts and stall samples of the split attention launch (512K, batch 8)
      # the last of PROFILE_STEPS steps, one attention launch each
      skip=$(python3 -c 'from mobalab.bench.decode import PROFILE_STEPS as P; print(P - 1)')
      timeout $(cap 150) ncu --clock-control none --kernel-name regex:moba_decode_attend --launch-skip "$skip" --launch-count 1 \
        --section SourceCounters --section WarpStateStats --section SchedulerStats \
        --metrics sm__cycles_active.min,sm__cycles_active.max,sm__cycles_active.avg,sm__ctas_launched.min,sm__ctas_launched.max,gpc__cycles_elapsed.max \
        -f -o "$W/decode_sass" \
        python3 -m mobalab.bench.decode --profile --seq-len 524288 --batch 8 --kernel split > "$W/decode_sass.log" 2>&1 \
      && ncu --import "$W/decode_sass.ncu-rep" --page source --csv --print-source sass > "$W/decode_sass.csv" \
           2>> "$W/decode_sass.log" \
      && ncu --import "$W/decode_sass.ncu-rep" --page raw --csv > "$W/decode_sass_raw.csv" 2>> "$W/decode_sass.log" \
      || status=1 ;;
    varlen)      timeout $(cap 200) python3 -m mobalab.bench.varlen --quick --out "$W/varlen" > "$W/bench_varlen.log" 2>&1 \
                   || status=1 ;;
    dims)        timeout $(cap 100) python3 -m mobalab.bench.attention --dims --out "$W/dims" > "$W/bench_dims.log" 2>&1 \
                   || status=1 ;;
    hf)          timeout $(cap 150) python3 -m mobalab.bench.varlen --quick --hf-only --hf-lengths 32K,128K --out "$W/hf" \
                   > "$W/bench_hf.log" 2>&1 || status=1 ;;
    hf-generate) timeout $(cap 120) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
                   tests/integrations/test_transformers_gpu.py -k moba_cache > "$W/pytest_hf_generate.log" 2>&1 || status=1
                 timeout $(cap 200) python3 -m mobalab.bench.varlen --hf-generate 32K,128K --out "$W/hf-generate" \
                   > "$W/bench_hf_generate.log" 2>&1 || status=1 ;;
    decode-full) timeout $(cap 590) python3 -m mobalab.bench.decode --out "$W/decode" > "$W/bench_decode.log" 2>&1 \
                   || status=1 ;;
    tiles-ncu) # shellcheck disable=SC2086  # TILES_NCU_ARGS are words
               tiles_ncu tiles ${TILES_NCU_ARGS:-} || status=1 ;;
    fwd-ab) # shellcheck disable=SC2086  # the variants and points are words
            timeout $(cap 240) python3 scripts/fwd_variants_ab.py --points ${FWD_AB_POINTS:-8K 64K 64K-B32} \
              --variants ${FWD_AB_VARIANTS:-base MOBA_FWD_MINB_SMALL_KT=0+MOBA_FWD_ROLLED_GATHER=0} \
              --top-k "${FWD_AB_TOPK:-8}" --kv-heads "${FWD_AB_KV_HEADS:-16}" > "$W/fwd_ab.md" 2>&1 || status=1 ;;
    tiles-ncu-ws) MOBALAB_ATTN_VARIANT=wgmma-ws tiles_ncu tiles_ws || status=1 ;;
    tiles-ncu-peer) # FlashMoBA built when it does not import yet (needs .peers/flash-moba/fm_bundle.tgz carried)
      { python3 -c 'from mobalab.bench._flash_moba_peer import load; import sys; sys.exit(load()[0] is None)' \
          || timeout $(cap 200) bash scripts/build_flash_moba.sh > "$W/build_flash_moba.log" 2>&1; } \
        && tiles_ncu tiles_flash_moba --impl flash-moba || status=1 ;;
    bwd-sass) # per-instruction counts and stall samples of the main backward kernel, mobalab's and FlashMoBA's (16K)
      bwd_sass bwd_sass mobalab 'regex:moba_bwd_(wg_)?(bf16|f16)_d' || status=1
      if [ "${BWD_SASS_PEER:-1}" != 0 ]; then
        { python3 -c 'from mobalab.bench._flash_moba_peer import load; import sys; sys.exit(load()[0] is None)' \
            || timeout $(cap 200) bash scripts/build_flash_moba.sh > "$W/build_flash_moba.log" 2>&1; } \
          && bwd_sass bwd_sass_flash_moba flash-moba 'regex:dq_dk_dv' || status=1
      fi ;;
    bwd-block) # the "block" backward variant: its GPU tests, A/B against "tile", its source counters at 16K
      timeout $(cap 150) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
        -k block_variant tests/kernels/test_backward_gpu.py > "$W/pytest_bwd_block.log" 2>&1 || status=1
      timeout $(cap 150) python3 scripts/bwd_variants_ab.py > "$W/bwd_variants_ab.md" 2>&1 || status=1
      MOBALAB_BWD_VARIANT=block timeout $(cap 200) python3 -m mobalab.bench.attention --backward --select 0,5,6 \
        --out "$W/bwd_block" > "$W/bench_bwd_block.log" 2>&1 || status=1
      MOBALAB_BWD_VARIANT=block bwd_sass bwd_sass_block mobalab 'regex:moba_bwd_blk_' || status=1 ;;
    bwd-step) # kept / gathered lists and longest-first segments, whole steps
      timeout $(cap 100) python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
        -k kept tests/kernels/test_backward_gpu.py > "$W/pytest_bwd_step.log" 2>&1 || status=1
      timeout $(cap 120) python3 scripts/bwd_step_ab.py --compare lists > "$W/bwd_step_lists.md" 2>&1 || status=1
      timeout $(cap 100) python3 scripts/bwd_step_ab.py --compare order --points 8K 16K 64K \
        > "$W/bwd_step_order.md" 2>&1 || status=1 ;;
    step-ab) # whole-step A/Bs of scripts/bwd_step_ab.py, one per word of STEP_AB (default "plan tpc"), 8K-64K
      for cmp in ${STEP_AB:-plan tpc}; do
        timeout $(cap 150) python3 scripts/bwd_step_ab.py --compare "$cmp" --points 8K 16K 64K \
          > "$W/step_ab_$cmp.md" 2>&1 || status=1
      done ;;
    peers) timeout $(cap 180) python3 -m mobalab.bench.attention --peers-quick --queued --out "$W/peers" > "$W/bench_peers.log" 2>&1 \
             || status=1 ;;
    rope) timeout $(cap 150) python3 -m mobalab.cli run rope --no-progress --out "$W/rope" > "$W/rope.log" 2>&1 || status=1 ;;
    *) echo "unknown step $step" >&2; status=2 ;;
  esac
  echo "$step: $(( $(date +%s) - start )) s" | tee -a "$W/steps.txt"
done

tar czf "$OUT/$NAME.tgz" -C "$W" .
echo "================ summary ================"
cat "$W/env.txt" "$W/steps.txt"
[ -f "$W/pytest_wgmma.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_wgmma.log" | cut -c1-220 | head -n 8; tail -n 1 "$W/pytest_wgmma.log"; }
[ -f "$W/pytest_wgmma_tile.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_wgmma_tile.log" | cut -c1-220 | head -n 12; tail -n 1 "$W/pytest_wgmma_tile.log"; }
[ -f "$W/pytest_wgmma_ws.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_wgmma_ws.log" | cut -c1-220 | head -n 12; tail -n 1 "$W/pytest_wgmma_ws.log"; }
[ -f "$W/bench_wgmma.log" ] && grep -E "^(FAILED|skipped)" "$W/bench_wgmma.log" | head -n 6
[ -f "$W/pytest_bwd_block.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_bwd_block.log" | cut -c1-220 | head -n 8; tail -n 1 "$W/pytest_bwd_block.log"; }
[ -f "$W/bwd_variants_ab.md" ] && cat "$W/bwd_variants_ab.md"
for f in "$W/bwd_step_lists.md" "$W/bwd_step_order.md" "$W"/step_ab_*.md; do [ -f "$f" ] && cat "$f"; done
[ -f "$W/bwd_ab.md" ] && grep -E "^\||Error|error" "$W/bwd_ab.md" | head -n 20
[ -f "$W/fwd_ab.md" ] && grep -E "^\||Error|error" "$W/fwd_ab.md" | head -n 30
[ -f "$W/pytest_hf_generate.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_hf_generate.log" | cut -c1-220 | head -n 8; tail -n 1 "$W/pytest_hf_generate.log"; }
[ -f "$W/pytest_bwd_graph.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_bwd_graph.log" | cut -c1-220 | head -n 8; tail -n 1 "$W/pytest_bwd_graph.log"; }
[ -f "$W/pytest_decode_paged.log" ] && { grep -E "^(FAILED|ERROR)" "$W/pytest_decode_paged.log" | cut -c1-220 | head -n 8; tail -n 1 "$W/pytest_decode_paged.log"; }
[ -f "$W/decode_paged_ab.log" ] && grep -E "^\|" "$W/decode_paged_ab.log"
[ -f "$W/decode_ab.log" ] && grep -E "^\||Error" "$W/decode_ab.log"
[ -f "$W/pytest_pairs.log" ] && { grep -E "^(FAILED|ERROR)|^pair lists" "$W/pytest_pairs.log" | cut -c1-220 | head -n 12; tail -n 1 "$W/pytest_pairs.log"; }
[ -f "$W/bench_wgmma_ws.log" ] && grep -E "^(FAILED|skipped)" "$W/bench_wgmma_ws.log" | head -n 6
for f in "$W/pytest_router_wgmma.log" "$W/pytest_router_split.log"; do
  [ -f "$f" ] && { grep -E "^(FAILED|ERROR)" "$f" | cut -c1-220 | head -n 12; tail -n 1 "$f"; }
done
[ -f "$W/router_stats.txt" ] && cat "$W/router_stats.txt"
for f in "$W"/router_ab/*/router_table.md; do [ -f "$f" ] && { echo "== $f"; grep -E "^\| [0-9]" "$f"; }; done
for n in router_sass fwd_sass; do
  [ -f "$W/$n.md" ] && { head -n 24 "$W/$n.md"; grep -A 14 "straight-line runs" "$W/$n.md"; }
  [ -f "$W/${n}_details.txt" ] && grep -E "Duration|Registers|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Warp Cycles Per Issued" "$W/${n}_details.txt" | head -n 12
done
[ -f "$W/bench_router.log" ] && grep -E "^FAILED" "$W/bench_router.log" | head -n 4
[ -f "$W/pytest_trained.log" ] && { grep -E "^(FAILED|ERROR)|^E  " "$W/pytest_trained.log" | cut -c1-220 | head -n 12; tail -n 1 "$W/pytest_trained.log"; }
[ -f "$W/pytest_gpu.log" ] && { grep -E "^(FAILED|ERROR)|^pair lists" "$W/pytest_gpu.log" | cut -c1-220 | head -n 40; grep -E "passed|failed|error" "$W/pytest_gpu.log" | tail -n 2; }
for f in "$W"/tiles_ncu_table.md "$W"/tiles_ws_ncu_table.md "$W"/tiles_flash_moba_ncu_table.md "$W"/fwd/*table*.md "$W"/bwd/*table*.md "$W"/bwd-graph/*table*.md "$W"/bwd-queued/*table*.md "$W"/bwd_block/*table*.md "$W"/decode/*table*.md \
         "$W"/decode-ncu/*table*.md "$W"/varlen/*.md "$W"/hf-generate/*.md "$W"/dims/*table*.md "$W"/hf/*.md \
         "$W"/peers/*table*.md "$W"/wgmma/*table*.md "$W"/wgmma-ws/*table*.md "$W"/router/*table*.md; do [ -f "$f" ] && cat "$f"; done
[ -f "$W/host_profile.log" ] && grep -E "^N |Error" "$W/host_profile.log"
[ -f "$W/host_waits.log" ] && grep -E "^N .*idle|Error" "$W/host_waits.log"
[ -f "$W/tree_ab.md" ] && { cat "$W/tree_ab.md"; grep -E "Error|failed" "$W/tree_ab.log" | head -n 4; }
[ -f "$W/mc_throughput.log" ] && tail -n 14 "$W/mc_throughput.log"
[ -f "$W/snr-vs-accuracy.log" ] && tail -n 18 "$W/snr-vs-accuracy.log"
[ -f "$W/rope.log" ] && tail -n 12 "$W/rope.log"
[ -f "$W/trained_study.log" ] && grep -E "models in|Error" "$W/trained_study.log"
rm -rf "$W"
exit "$status"
