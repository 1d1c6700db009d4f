// MoBA decode over a KV cache in two or three plain launches: block scores, (selection,) attention. Many small
// CTAs, no persistent work queue, no waits between CTAs: the bandwidth-first alternative to decode.cu (same
// semantics, layouts and outputs; see docs/design.md, "MoBA semantics"). Where the attention CTAs run in one wave
// and hold their kv head's entries and rows (at most 8 rows), they select themselves (2b below) and the selection
// launch is left out.
//
// Layouts (all contiguous, as decode.cu):
//   q        (b, q_len, heads, D) T           queries of the newest q_len tokens of every sequence
//   k, v     (b, kv_heads, capacity, D) T     the cache, head-major: one block of one kv head is one slab
//            (paged caches, the attend_paged kernels: (n_pages, kv_heads, page_size, D), a page table per
//            sequence; page_size a multiple of B, so a block is still one slab)
//   sums     (b, kv_heads, n_blocks_cap, D)   fp32 running key sums S_j of every block; built with
//                                             MOBA_DECODE_CENTROIDS_INPUT=1 (centroid_precision "input") T block
//                                             means T(S_j / B) instead (MobaKVCache's 16-bit copy: half the bytes)
//   lengths  (b,) int32                       L_b, tokens held per sequence
//   scores   (b, kv_heads, R, n_cols) fp32    scratch: s_j of every row, n_cols = the longest sequence's
//                                             candidate blocks (a row of one kv head is one contiguous run)
//   tops     (b, kv_heads, R, n_bat) fp32     (2b only) a row's largest score in every score batch of bw blocks
//   sel      (b, q_len, heads, top_k) int32   slot 0 own block, then k-1 past blocks, -1 unused
//   out      (b, q_len, heads, D) T, lse (b, q_len, heads) fp32 (natural log)
// Query i of sequence b sits at t = L_b - q_len + i. Rows of one kv head kh: r = i * G + g (G = heads /
// kv_heads, query head kh * G + g), R = G * q_len rows; entry e = r * top_k + s names sel slot s of row r.
//
// 1. moba_decode_route_score_*: one CTA per (sequence, kv head, row group of <= 64 rows, range of
//    range_blocks candidate blocks). It issues its warps' first block-sum loads, stages the group's query
//    rows (fp32) and own blocks in shared memory, and after that one barrier every warp streams on its own:
//    a batch is 16 float4 loads per lane (ld.global.nc, all issued before the first is used: 8 KB per warp,
//    16 block sums at d 128, 32 at d 64; 8 lanes per block sum), then for every row s_j = q . S_j in fp32
//    (candidates are complete blocks of B = power-of-two tokens, so this ranks exactly like q . S_j / B;
//    8-lane butterfly), NaN where j is not a candidate of the row (j >= the row's own block), stored to the
//    scratch by the lane whose part index names the batch slot (16 or 32 consecutive floats per row). Built for
//    centroid_precision "input" (MOBA_DECODE_CENTROIDS_INPUT=1) it streams the cache's T means T(S_j / B) instead,
//    8-byte loads in the same lane layout (4 KB per warp and batch), s_j = q . T(S_j / B); with 2b, also
//    the batch's top per row (the largest candidate score of its bw = 16 / 32 blocks, NaN for none: 4 fmaxf and two
//    shuffles a row, one store). No merging, no barrier and no shared-memory write in the streaming loop.
// 2. moba_decode_route_select: wpr warps per (sequence, kv head, row), 8 / wpr rows per CTA (the plan: wpr 1
//    for up to 8 chunks of candidates, a short row being one warp's work with no merging, else 8). Each warp scans
//    32-candidate chunks of the row's scores (chunk c holds blocks own - 1 - 32 c - lane: from the newest block
//    down; 8 chunks' loads issued together, the next 8 in flight while these are ranked) and keeps the row's
//    best k-1 so far as a sorted list held one entry per lane. Its first round of chunks: each lane's best
//    candidate, found without shuffles, then the lanes' bests sorted by a warp bitonic sort into the list, then
//    only the candidates that beat the list's last entry offered (a lane whose best missed the list has none;
//    measured on an H200 against offering every chunk: routing 1.3-3.3 us shorter, e.g. 512K 54.6 -> 51.3 us,
//    32K 18.2 -> 15.5 us); in later rounds a chunk's candidates that beat the list's last entry (one ballot;
//    rare once the list is good). An offered candidate is inserted at its rank by shifting the lanes behind it.
//    A row's wpr lists are then merged pairwise in a tree of bitonic merges (log2 wpr levels), and the row's
//    first warp writes sel. The order is (score desc, block desc), a strict total order on distinct blocks, so
//    the result is the reference's exactly (ties to the higher index); NaN never enters a list; fewer
//    candidates than k-1 leave -1.
//    The select CTA also enters the row's blocks into its kv head's set of selected blocks (a bitmap of
//    n_words 32-bit words in a zeroed workspace, atomicOr), so no later CTA has to find out which entries
//    name the same block.
// 2b. The selection inside the attention launch (entry points of their own, moba_decode_route_score_tops_* and
//    moba_decode_attend_select_* / attend_paged_select_*: template instantiations, so that the three-launch kernels
//    keep their machine code; bw = dsp_score_batch(D)): every attention CTA of a kv head first selects all its rows,
//    one warp per row (dsp_select_row_tops: level 1 ranks the row's batch tops, level 2 every candidate of the best
//    k-1 batches, at most (k-1) bw; exact, the same order and so the same sel as 2), keeps the entries in shared
//    memory, enters the blocks into the kv head's set (every CTA all of them, so its own entries make the set whole
//    whatever the others have done) and CTA 0 writes sel; then step 3 as below. The attention launch is a
//    programmatic dependent launch (sm_90; _launch.py): the score CTAs let it launch at their start, so its CTAs take
//    the SMs as the score CTAs leave them, copy their query rows and wait for their own kv head's scores: each score
//    CTA, after a barrier behind its last store (or at once where its range lies beyond its sequence), adds one to its
//    kv head's release counter (red.release.gpu), thread 0 of an attention CTA waits until the counter holds the kv
//    head's n_rg * n_range releases (ld.acquire.gpu), a barrier carries that to the CTA, whose loads of scores and tops
//    then read L2 (ld.global.cg), and the kv head's last attention CTA empties the counter. So a kv head's selection
//    and copies start as soon as its own score CTAs are done, under the other kv heads' streaming. (Build option
//    DSP_OWN_WAIT=0: the wait for the whole score launch, griddepcontrol.wait.) Measured on an H200 in two
//    interleaved runs at nine points against the whole launch's wait: 128K 62.1-63.0 against 63.0-63.4 us, 128K B 32
//    k 8 59.7-60.7 / 61.2-65.4, B 64 k 4 43.1-43.3 / 43.7-46.1, 128K batch 1 26.4-27.1 / 26.7-27.5, 512K 82.1-86.9 /
//    83.2-89.7, equal at k 16 and batch 64; 32K 0.5-0.6 us longer (51.3-51.9 against 50.6-51.2: two score CTAs per kv
//    head, so little to overlap and the releases' barrier and fence on the score CTAs' path). A trace at 128K B 32
//    k 8: the attention launch's span 25.9 -> 23.7 us, the wait 3200 -> 1000 cycles, the merge 4.4 -> 2.9 us.
//    It trades the select launch and one kernel boundary (~7 + 2.5 us at 512K) for the tops in the score pass (~1-3
//    us there) and a selection before each CTA's first copy (~4 us). Measured on an H200 (RESULTS.md): with the
//    selection compiled into the one attention kernel behind a runtime test, 1.7-3 us shorter a step than three
//    launches, but 128K at B 128 ~3 us longer than the kernels before it (the test cost the three-launch kernels as
//    much); as kernels of their own (7312 instructions against 9360 for the attention kernel) 3-4.5 us shorter than
//    three launches at every one-wave point (512K 85.7 against 89.6 us, 128K 64.9 / 67.8, 128K B 64 k 4 46.2 / 49.2,
//    B 32 63.4 / 67.6); the dependent launch then 1-3 us shorter again (512K 84.8 against 85.8, 128K 60.9-61.2
//    against 63.0-66.0, B 64 k 4 44.5 / 45.9, 32K 51.6 / 52.8, 128K batch 1 27.5 / 29.0). Each CTA repeats the
//    selection, so a plan whose attention CTAs run in several waves keeps the select launch (at 32K, batch 64, in
//    four waves: 12 us longer).
// 3. moba_decode_attend_*: cpg CTAs of 4 warps per (sequence, kv head) (about one wave of three per SM; every
//    CTA of a kv head reads its set, in windows of 128 words, and numbers the selected blocks in ascending
//    order, batches of at most 128). Item u * n_chunks + c is chunk c (<= 64 tokens) of the u-th selected block
//    of a batch; CTA p takes a contiguous run of each batch's items, so consecutive items mostly share a block,
//    whose rows (entries, rows, positions) are gathered once. While it computes one item, the K and V of its
//    next item are in flight: thread 0 announces the item's bytes on its stage's mbarrier and issues one
//    tensor-map copy (cp.async.bulk.tensor.2d) per 64 columns of K and of V, boxes of chunk rows x 128 bytes that
//    the copy engine lands with its 128-byte swizzle in two stages of 32 KB at d 128 (the stages first in shared
//    memory, 1 KB-aligned); every thread waits for the stage's phase (the k-th use of a stage, counted over the
//    batches, is phase k), and V rows beyond L_b are zeroed after they land. (Build option DSP_ATTN_TMA=0, the
//    kernel before: every thread issues 16-byte cp.async.cg copies with the L2::128B prefetch hint into the same
//    swizzle, rows of D elements, zeros beyond L_b.) For the rows that selected the block (passes of <= 4 rows,
//    zero rows padding the 16-row tiles) warp w takes tokens 16w .. 16w + 15: S = Q K^T by mma.sync m16n8k16
//    (K by ldmatrix), masked after the row's position, the max and sum of P = 2^(S - max) over its tokens
//    (scale * log2 e folded in), and P V by m16n8k16 (P rounded to q's type, V by ldmatrix.trans); one barrier,
//    then the warps' (max, sum, P V) are combined per row. (Items of 32 tokens, 8 a warp, P V by m16n8k8, five
//    CTAs per SM: the build option DSP_ATTN_CHUNK=32, DSP_ATTN_MIN_CTAS=5, the kernel before; see "Measured"
//    below.) A run of chunks of one block folds into one base-2 partial (m, l, o) per row, written to the slot
//    (r, s, c) of the run's first chunk (the run's other slots get m = -inf); with more than 4 rows every chunk
//    writes its own partial. So a block that several rows of a kv head select is read once. The kv head's
//    entries and query rows stay in shared memory when they fit (6 KB). The last CTA of the (sequence, kv head)
//    merges each row's k * n_chunks slots: M = max m, L = sum l 2^(m - M), out = sum o 2^(m - M) / L in q's dtype,
//    lse = (M + log2 L) ln 2 (unused slots (sel -1) and slots with m = -inf weigh 0 and are not read), then
//    empties the set.
//    History, each step measured on an H200 (512K, b 8, attention launch alone, Nsight Compute):
//    one CTA per (entry, 64-token chunk) that first scanned the entries for an earlier owner of its block:
//    ~62 us for 121 MB (barrier stalls, 47% occupancy; every CTA's copies behind two L2 round trips); CTAs
//    per kv head walking the set with the next chunk in flight, CUDA-core math: 72 us (8 warps, 2 CTAs per
//    SM), 67 us (4 warps, 5 per SM), 59 us (each warp its own tokens, one combine per pass); on the tensor
//    cores 60 us; the per-SM source counters then showed ~40% of the instructions in the copy loop's address
//    arithmetic and a 7 us merge at the end of the launch: copies off per-item bases 56 us, runs folded into
//    one partial per block (a quarter of the partials to merge) 52 us. A per-CTA trace (globaltimer)
//    showed the item loops ending between 27 and 46 us for the same work: each CTA keeps one 16 KB item in
//    flight (3.2 us per item), and more, shorter CTAs (several waves) did not move it; neither did two items in
//    flight per CTA (three stages, the P.V sums in the K and V rows a warp has read, four CTAs per SM: 58 us),
//    so the loop is bound by its dependent instructions as much as by the memory latency.
//    Nor did taking the CTA barriers out: a warp-item variant (every warp its own pipeline of 16-token items,
//    three stages per warp, the running softmax and P.V in registers, whole 64-token segments per warp so that
//    a partial does not depend on the set's order; 2 CTAs of 4 warps per SM at 200 registers), in an
//    interleaved A/B against this kernel at nine points: equal within 2 us at 32K-1M, B 128, k 8; 5-7 us slower
//    at B 64 and B 32 (128K, B 64, k 4: 58.9 against 53.8 us for the step); faster only at k 16 (127.6 against
//    130.7) and batch 64 (321 against 338). Nor did balancing the CTAs' work: a globaltimer trace at 512K had
//    loops of equal work ending 26-47 us after the launch, but segments of two chunks claimed from a per-kv-head
//    counter (each CTA taking more as it finishes) measured equal at 512K and 1M, 1-3 us shorter at 128K B 128,
//    2 us longer at B 64, k 4 and 10 us longer at batch 64 (348.5 against 338.3 us).
//    Timing probes (DSP_ATTN_PROBE) of the 32-token kernel at 512K, step us: 101.5 as built, 99.2 without the
//    math, 79.0 without the copies, 96.2 without the merge; so the copies, not the math, set the launch's time,
//    and with no copies at all the launch still takes ~32 us (start, set, per-item barriers and merge).
//    64-token items, 16 tokens a warp, three CTAs per SM (twice the bytes per item's fixed costs; the plan's
//    CTAs per kv head from the CTAs that fit an SM, or ~16 items each where the kv heads outnumber a wave's
//    slots), interleaved against the 32-token build: 512K 97.8 against 100.9 us, 1M 133.4 / 134.0, 128K 73.4 /
//    76.1, 128K at k 16 114.1 / 122.4, 32K 62.0 / 65.3, batch 64 331.5 / 334.6, equal at B 64 / B 32. Three or
//    four stages (two or three items in flight: 32 tokens at three CTAs per SM, 64 at two) were 1-15% slower at
//    every point but one; with those, more items in flight do not shorten the copies. Nsight Compute of the
//    64-token launch at 512K: 49.5 us, 2.52 TB/s (52% of DRAM peak), SMs active 61.6 K / 76.0 K / 89.8 K cycles
//    (min / mean / max) of 93.4 K: the last SMs run ~15% longer than the mean.
//    A per-CTA trace (DSP_ATTN_TRACE, scripts/decode_attn_trace.py) at 512K: the first item ~2 us after the
//    launch, loops ending 27.5 / 39.1 / 45.4 us (min / median / max), the merge 4 us after the last; per item
//    (thread 0's clock64) ~1460 cycles issuing the copies, ~80 waiting for them, ~1800 math, ~1900 combine and
//    partials, ~800 gathering rows, ~650 query rows; without copies an item costs ~3200 cycles. So the copies'
//    time goes into issuing them (the SM's load path holds only so many requests in flight) and into the phases
//    that touch memory beside them, not into waiting. Neither fewer copy instructions (whole items without
//    per-row tests: equal within 0.5%) nor bulk copies on mbarriers (two per row, rows rotated for ldmatrix:
//    the copy engine took ~5200 cycles an item for 240 small copies, 0.73-0.97x) shortened that; the L2::128B
//    prefetch hint did a little (1.00-1.055x, 256B 0.94-1.0x). Tensor-map copies (four 8 KB boxes an item, one
//    thread issuing) did: in an interleaved A/B against the cp.async copies, step us, 512K 89.6 / 95.9-102.7,
//    1M 136.8 / 143.5, 128K 68.4 / 75.1, 128K B 64 k 4 48.8-49.1 / 49.8-52.7, B 32 67.5 / 69.8-73.8, k 16 98.1 /
//    109.6, 32K 55.1 / 59.6-60.0, batch 64 276.1 / 316.4 (1.02-1.15x); the trace then has ~350 cycles an item
//    issuing, ~2200-2400 waiting for the data, ~1340 math and ~860 combine, the loops streaming ~3.9 TB/s between
//    the first item (~2 us) and the ends (25 / 33 / 38 us, min / median / max), so the launch is now bandwidth-
//    bound, its losses the ramp, the SMs' uneven ends and the merge. Adding depth did not help: the item after
//    the next one prefetched into L2 by the copy engine 0.96-1.0x, more CTAs per kv head (12, 24) 0.89-0.95x,
//    32-token items at five CTAs per SM 0.95-1.04x.
// Counters: one per (sequence, kv head) for the attention launch's completion tickets, and with 2b a second one per
// (sequence, kv head) that its score CTAs release; counters and sets are back to zero when the attention launch ends.
//
// Bytes (HBM) per sequence and kv head, n_p = floor((L - 1) / B) candidate blocks, U = blocks in the union of
// the kv head's selections: sums 4 * n_p * D * ceil(R / 64) + K, V 2 * 2 * U * B * D (the own block's chunks
// beyond L are not read) + q, out. The scores, 4 * R * n_p written and read once, stay in L2 when small
// (512K, b 8, 32 / 8 heads: 4.2 MB against 134 MB of sums; their share is R / (D ceil(R / 64)), at most
// 1 / 2 at d 128 and 1 at d 64 for 64 rows, where they may reach HBM); partials stay in L2.
// FLOPs: scores 2 * b * heads * q_len * n_p * D, attention 4 * b * heads * q_len * |S_t| * D; at 512K, b 8,
// 32 / 8 heads, d 128, B 128, k 8: 268 + 134 MFLOP for 255 MB (~1.6 FLOP per byte; the score pass alone 2 FLOP
// per byte of sums at R = 4): memory-bound; the score pass on CUDA cores (exact fp32 scores), the attention on
// the tensor cores. Selection per warp: a lane-local best over the first round's 8 chunks, one 32-lane sort, a few
// offers on random data (every candidate at worst), then ~one ballot per later chunk.
//
// Measured (H200, batch 8, 32 / 8 heads, d 128, B 128, k 8, q_len 1, L2 flushed; RESULTS.md): score pass
// 134 MB in ~38 us at 512K (3.5 TB/s, 75% of DRAM peak: 16 warps per SM, each with 8 KB in flight whenever it
// is not scoring); selection ~13 us at 512K, ~7 us at 32K (latency-bound: a globaltimer trace at 128K put ~1400
// cycles per warp into the lengths load, ~7300 into ranking its chunks and ~4500 into the merge of 8 warps' lists,
// all dependent compare-and-shuffle chains, before the 64-bit keys took 1.6-4.3 us off the routing); attention
// ~52 us for 121 MB at every length (~29 blocks per kv head; ~50 us with 64-token items, ~41.5 us with the
// tensor-map copies). Step 0.102 ms at 512K (58% of the copy bandwidth; 0.098 ms, 62%, with 64-token items;
// 0.090 ms, 66-67%, with the tensor-map copies), 0.069 ms at 32K (0.054), 0.052 ms at 128K, B 64, k 4 (43%;
// 0.049 ms, 45%, still the lowest at batch 8 and 128K-1M). Nsight
// Compute at 128K, batch 8 (before the keys): score 22.1 us, select 12.5 us, attention 20.0 us at B 64, k 4
// (67 + 27 MB); 14.1, 13.7 and 52.9 us at B 128, k 8 (the attention at 48% of DRAM peak). 70% of the roofline
// at B 64, k 4 is a 31.6 us step: the score and attention launches at the copy bandwidth alone take 22 us, so
// with a selection of ~9 us in between it is out of reach unless the selection overlaps the streaming.
// Hiding the selection behind the streaming was measured three ways and lost each time: the three steps as
// one launch of ticketed 128-thread CTAs (a kv head's selection and attention waiting on counters of its own
// scores; 1-24% slower: the score items lose bytes in flight at 96 registers, and the last kv head's score,
// selection and attention chain stays as long as the launches it replaced), the score CTAs ranking their
// ranges with the last CTA of a row group merging (the ranking stalls the streaming: equal at best), and
// select CTAs of 16 or 32 warps per row (one round of loads each, but more barrier levels: 4-15 us slower).
// Nor did a pipeline over the batch from the host: the sequences in 2 or 4 groups, each group's three launches
// on a stream of its own, a group's score launch after the previous group's (so that one group's selection
// could run beside the next group's streaming), captured in one CUDA graph. With each group's own plan (one
// wave per launch) 2 groups were 1-8 us slower at every point (128K, B 64, k 4: 58.8 against 50.4 us; 512K
// 110.3 against 104.8; batch 64: 361 against 337) and 4 groups 5-30 us slower; with the whole batch's ranges
// and CTAs per kv head in every group, 2 groups were within 2 us at 512K and 1M and 1-3 us slower at 128K,
// B 64, k 4; stream priorities (the graph instantiated to honour its nodes' priorities) changed nothing. Each
// launch needs the whole GPU to stream at its rate, so a group's selection finds no SMs beside the next
// group's score CTAs, and every group pays the launches' ramp and tail.
// History: the routing used to be one launch whose CTAs merged every 32 KB tile into per-row top lists in
// shared memory between their loads (and the last range of a row group merged the ranges' lists); measured
// on an H200 it streamed the sums at under 1 TB/s (512K: 0.147 ms for 134 MB; Nsight Compute: barrier
// stalls, 20% of DRAM peak; the whole step 0.21 ms against the fused kernel's 0.176), hence this split.
// Why bandwidth-first should get to ~3.5 TB/s where decode.cu did not: every warp issues all of a batch's
// loads before it uses any, there is no hand-over wait between CTAs (the kernel boundaries are the only
// barriers), and 16 streaming warps per SM overlap one warp's scoring with the others' loads.
// Costs this design accepts: two kernel boundaries (nearly free in a CUDA graph: the three launches' Nsight
// Compute durations add up to the step's time within 1 us), the score scratch's write and read (L2), and the set
// of selected blocks (a few atomics per row in the select launch).
// Programmatic dependent launch (cuLaunchKernelEx with programmatic stream serialization, griddepcontrol.wait
// before the first read of the previous launch's output; kept for the two launches of 2b, 1-3 us shorter there, where
// the score CTAs trigger and every SM holds two score CTAs, so the attention CTAs arrive as those leave) did not
// shorten the three launches' boundaries, measured in an
// interleaved A/B on an H200 at nine points: with no early trigger within 0.7 us everywhere; with the select CTAs
// letting the attention launch at their start, 0.5-2.3 us shorter at 32K-1M and k 16 but 1-3 us longer at B 64
// and 28 us longer at batch 64 (366.5 against 338.3 us: the attention CTAs took the SMs in the order the select
// CTAs left them, 5 per SM on the first ones, instead of spread evenly); with the score CTAs triggering too, 1M
// 5 us longer. Measured again on the tensor-map attention launch (three CTAs per SM): the select CTAs triggering the
// attention launch 1-5 us longer at every point (512K 92.5 against 88.3-89.0 us; its CTAs' loops ran ~20% slower).
// A timeline of the step (DSP_ROUTE_TRACE beside DSP_ATTN_TRACE, scripts/decode_attn_trace.py; 512K, L2 flushed, us
// after the first score CTA's start): a score CTA's length arrives at 0.4, its first batch at 5.5-6.9 (16 MB of
// first loads in flight at once), the score CTAs end at 26-33.5; the first select CTA starts at 36.0, the last ends
// at 43.3; the first attention CTA starts at 45.6, its loops end at 70-82.5 and its last merge at 85.5 (a step of
// ~89 us): each kernel boundary costs 2.3-3.3 us, the selection ~7 us, the attention launch's uneven loop ends ~5-10.
// Measured against this and not kept (interleaved A/B at eight points, step us): the selection inside the score
// launch, by the last of a row group's CTAs to finish (a ticket), 512K 96.3 against 88.8 (its ranking at two warps
// per row took 15 us); every score CTA ranking its range after streaming and the last merging the rows' lists,
// within 1 us at 512K and 128K, 5 us longer at 32K batch 64, 1M 134.5 against 124.6-135.2 (the ranking after the
// last score CTA took as long as the select launch, 7-9 us); the score batches claimed from a per-row-group counter
// a batch ahead (so that faster warps take more), 512K 95.1 against 89.0, 1M 139.5 against 124.5 (the CTAs' ends
// spread as much, and later); the first score loads issued before the length (clamped to the longest sequence's
// candidates) 0-0.9 us shorter at 128K, equal at 512K and 1M, 0.8 us longer at batch 64 in one of two runs: the
// length's round trip is not on the critical path, the first batch's wait behind 16 MB of first loads is.
// Measured on the way to 2b and not kept: the select launch's last row of a kv head prefetching the first items of
// its attention CTAs into L2 (cp.async.bulk.prefetch.L2 after a ticket), 2.5-6 us longer with one item per CTA
// and 6-21 us with four; the batch-tops selection as its own launch (one warp per row), the launch ~1 us shorter
// but the score pass ~3 us longer (the tops), so -1 to +3 us a step; the query rows by cp.async in 2b, equal.
// Measured with 2b and the dependent attention launch, not kept: each score warp's next one or two batches
// prefetched into L2 (cp.async.bulk.prefetch.L2, 8 KB each) ahead of its loads, 3-6 us longer at 512K and 128K (the
// first batches land ~2 us later and the score CTAs end ~4 us later: the loads in flight already keep the DRAM busy);
// the merge's first partials copied beside its (m, l) loads and the selecting CTAs numbering their blocks from their
// own entries instead of the kv head's global set, equal.
// A timeline with 2b at 512K: score CTAs end 30-36 us, attention CTAs start 38.5, reach their first item 44.1-45.4,
// end their loops 72.3-81.5 and the step ends 85.7 (89.6 with the select launch in the same run).
// With the dependent launch the selecting CTAs' phases before their first item (thread 0, mean cycles; 128K B 64 k 4
// / B 32 k 8 / B 128 k 8 / 512K): query rows ~950, the grid wait 18-3900, the row selection 6500 / 8300 / 7600 /
// 8300 (its two dependent score loads and two rankings), entries and set ~270, the set's reading, numbering and
// first copy ~3400-4100. The score CTAs' uneven ends (128K B 32 k 8: 31-40 us) follow their SMs (two CTAs on one SM
// end together, correlation 0.73-0.86; the 8 SMs holding one score CTA end first). Measured and not kept: shorter
// ranges, the score CTAs in two to eight waves so that the CTA scheduler balances the SMs (the scores end later:
// 128K B 32 k 8 64.2 against 62.5 us a step, 512K 85.6-86.2 against 84.4, 128-block ranges 12-22% slower); each
// lane's best batch prefetched into L1 (prefetch.global.L1) before level 1 ranks, equal.
// With each kv head's own release counter, thread 0's row selection split (128K B 32 k 8, cycles): level 1's loads
// ~2150, its ranking ~1800, level 2's loads ~2750, its ranking ~1750 (the L2 round trips long while the score CTAs
// and the other kv heads' copies stream). Measured and not kept: each lane's best batch of level 1's first round
// loaded into registers before level 1 ranks and put into a shared-memory scratch (in the still unused stages) for
// level 2, so that level 2 reads the listed batches their lanes hold without a round trip: with a lane's own batch a
// float per load, level 1's ranking took 7450 cycles (its shuffles behind the loads) and the step 1-4 us longer; with
// coalesced loads (consecutive lanes, consecutive floats) ranking 3040 and level 2's loads still 2350 (the loads had
// not landed), 0.5-1.7 us longer at eight of nine points.
// Measured with the own wait and not kept: the score pass staggered over the kv heads, so that their scores complete
// one after another and a completed kv head's selection and copies run under the later kv heads' streaming (a few
// score CTAs per SM, all resident, walking items (kv head, range of one pass) kv head after kv head, CTA c taking
// items c, c + gridDim.x, ...; each item's next loads issued before a closing CTA barrier, then one release per item;
// the same scores, tops and selections bit for bit). With one score CTA per SM (8 score warps; two selecting
// attention CTAs fit beside it: 30 K + 2 x 15 K of the SM's 64 K registers) the step was 512K 117.8 against 82.8 us,
// 128K B 32 k 8 94.3 / 60.0, B 64 k 4 60.4 / 43.0; with two score CTAs per SM (none fits beside them: the order alone)
// 97.0 / 74.6 / 50.4; with items of four passes (a quarter of the barriers) 93.2 / 71.7 / 47.5 and 84.8 / 62.5 /
// 43.2. So the streaming needs its 16 warps per SM of register-held loads (half of them cost more than the overlap
// gives), and a CTA barrier per pass adds the slowest warp's load latency to every pass. A staggered pass would need
// its bytes in flight outside the registers (bulk copies of whole batches into shared memory by one thread), so that
// attention CTAs fit beside streaming that keeps its rate.
//
// Element conversion, the copies and loads, NaN / -inf and the dynamic shared memory come from decode_common.cuh
// (shared with decode.cu), ldmatrix and mma.sync from ptx.cuh (shared with every kernel); under
// DEC_HOST_EMULATION the host harness supplies both (cuda_host.h, ptx_host_model.h).

#include "decode_common.cuh"
#include "ptx.cuh"

#define DSP_THREADS 256
#define DSP_WARPS (DSP_THREADS / 32)
#define DSP_FLAGS 64                   // bytes of flags at the start of shared memory
#define DSP_SCORE_LOADS 16             // float4 block-sum loads per lane of one score batch (8 KB per warp)
#define DSP_ROUTE_MAX_ROWS 64          // rows of one score row group
#define DSP_SELECT_LOADS 8             // 32-candidate chunks a select warp loads together
#ifndef DSP_ATTN_CHUNK                 // a build option for side-by-side timing (32: 8 tokens a warp)
#define DSP_ATTN_CHUNK 64              // most tokens of one attention item (16 a warp)
#endif
#define DSP_ATTN_ROWS 4                // rows per pass over a chunk
#define DSP_SCORE_MIN_CTAS 2           // __launch_bounds__ minimum CTAs per SM (<= 128 registers)
#define DSP_SELECT_MIN_CTAS 4
#ifndef DSP_ATTN_MIN_CTAS              // (5 with 32-token items)
#define DSP_ATTN_MIN_CTAS 3
#endif
#define DSP_ATTN_THREADS 128           // attention CTAs: 4 warps, several CTAs per SM out of step with each other
#define DSP_ATTN_WARPS (DSP_ATTN_THREADS / 32)
#ifndef DSP_ATTN_STAGES                // a build option for side-by-side timing (2 .. 4)
#define DSP_ATTN_STAGES 2              // K/V chunks per attention CTA: one computed, the next in flight
#endif
#define DSP_MERGE_ML 2                 // per lane: slots whose l the merge keeps from its first load
#define DSP_ATTN_CACHE 6144            // most bytes of a kv head's entries and query rows kept in shared memory
// Timing probes of the attention launch (build options, wrong outputs; scripts/decode_split_ab.py): 1 leaves out
// the math of an item (its copies, waits, barriers and the merge stay), 2 leaves out its copies
// (the math reads whatever the stages hold), 3 leaves out the merge.
#ifndef DSP_ATTN_PROBE
#define DSP_ATTN_PROBE 0
#endif
#ifndef DSP_ATTN_WHOLE_COPY            // a whole item's copies without per-row tests (0: every row tested)
#define DSP_ATTN_WHOLE_COPY 1
#endif
#define DSP_STR2(x) #x                 // a build option's value as a string (inside inline PTX)
#define DSP_STR(x) DSP_STR2(x)
#ifndef DSP_SCORE_L2_PREFETCH          // an L2 prefetch size for the score pass's block-sum loads (64/128/256; 0 none)
#define DSP_SCORE_L2_PREFETCH 0
#endif
#ifndef DSP_ATTN_L2_PREFETCH           // the L2 prefetch size of the K / V copies (cp.async .L2::64B/128B/256B; 0 none)
#define DSP_ATTN_L2_PREFETCH 128
#endif
#ifndef DSP_ATTN_TMA                   // K and V by tensor-map bulk copies on mbarriers, issued by one thread (0: 16-byte
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 900 || MOBA_PORTABLE)  // cp.async copies by every thread; the
#define DSP_ATTN_TMA 0                 // tensor-map build holds two stages); before sm_90 (and built MOBA_PORTABLE)
#else                                  // the cp.async copies: tensor maps and mbarrier byte counts are sm_90's
#define DSP_ATTN_TMA 1
#endif
#endif
#define DSP_ATTN_BARS 48               // byte offset of the stages' mbarriers in the attention CTA's flags (tensor maps)
#ifndef DSP_OWN_WAIT                   // selecting attention CTAs wait for their own kv head's score CTAs (a release
#define DSP_OWN_WAIT 1                 // counter each; 0: for the whole score launch, griddepcontrol.wait)
#endif

// A per-CTA timing trace of the attention launch (build option DSP_ATTN_TRACE=1; scripts/decode_attn_trace.py reads
// it): thread 0 notes %globaltimer at the CTA's start, first item, loop end and end, and clock64 cycles summed per
// phase of the item loop, into dsp_trace[blockIdx.x] (DSP_TRACE_SLOTS words; the layout is the script's).
#ifndef DSP_ATTN_TRACE
#define DSP_ATTN_TRACE 0
#endif
#ifndef DSP_ROUTE_TRACE  // the routing launches' trace (below)
#define DSP_ROUTE_TRACE 0
#endif
#if DSP_ATTN_TRACE || DSP_ROUTE_TRACE
__device__ __forceinline__ unsigned long long dsp_gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
    return t;
}
#endif
#if DSP_ATTN_TRACE
#define DSP_TRACE_CTAS 4096
#define DSP_TRACE_SLOTS 24
__device__ unsigned long long dsp_trace[DSP_TRACE_CTAS][DSP_TRACE_SLOTS];
// Slots: 0 .. 7 cycles of the phases (0 start, batch setup (set window, numbering) and the completion count,
// 1 issue, 2 gather rows,
// 3 wait, 4 query rows + barrier, 5 math + barrier, 6 combine + partials, 7 merge), 8 .. 11 globaltimer at the
// start, first item, loop end, end; 12 items, 13 gathers, 14 SM id, 15 last CTA; 16 .. 19 (selecting kernels)
// cycles of the selection before phase 0's rest: 16 query rows, 17 the grid wait, 18 thread 0's row selection
// (its loads and both levels' ranking), 19 the entries into shared memory, sel and the set, and the barrier after
// them (phase 8 + x of tr_acc is slot 16 + x); 20 .. 23 thread 0's row selection split: level 1's loads (the batch
// tops), level 1's ranking, level 2's loads (the scores), level 2's ranking (phase 12 + x is slot 20 + x). Kept in
// registers (a global
// read-modify-write per lap would add its latency to every phase), written once at the end.
#define DSP_TR_LAP(i)                                   \
    do {                                                \
        const long long now_ = clock64();               \
        tr_acc[i] += (unsigned long long)(now_ - tr_clock); \
        tr_clock = now_;                                \
    } while (0)
#define DSP_TR_STAMP(i) do { tr_g[i] = dsp_gtime(); } while (0)
#define DSP_TR_ADD(i, val) do { tr_n[i] += (val); } while (0)
#define DSP_TR_FLUSH(last) tr_flush(last)
#else
#define DSP_TR_LAP(i) do { } while (0)
#define DSP_TR_STAMP(i) do { } while (0)
#define DSP_TR_ADD(i, val) do { } while (0)
#define DSP_TR_FLUSH(last) do { } while (0)
#endif

// A trace of the routing launches (build option DSP_ROUTE_TRACE=1; scripts/decode_attn_trace.py reads it beside the
// attention launch's): thread 0 of every score CTA notes %globaltimer at its start, when its sequence's length has
// arrived, after its first batch is scored (the first block sums have landed) and at its end (after a CTA barrier),
// then its SM; thread 0 of every select CTA at its start and end. The layout is the script's.
#if DSP_ROUTE_TRACE
#define DSP_ROUTE_TRACE_CTAS 8192
__device__ unsigned long long dsp_score_trace[DSP_ROUTE_TRACE_CTAS][8];
__device__ unsigned long long dsp_select_trace[DSP_ROUTE_TRACE_CTAS][2];
#define DSP_RT_STAMP(arr, slot)                                                                     \
    do {                                                                                           \
        if (threadIdx.x == 0 && blockIdx.x < DSP_ROUTE_TRACE_CTAS) arr[blockIdx.x][slot] = dsp_gtime(); \
    } while (0)
#else
#define DSP_RT_STAMP(arr, slot) do { } while (0)
#endif

// ---- ranking ----
// Not decode.cu's dec_before: this kernel compares (score, block) only (the blocks compared are distinct, so
// no position is needed). The code, and so each kernel's measured machine code, differs, so both stay.

// A candidate (v, j) as one 64-bit key whose unsigned order is the ranking: higher score, then higher block
// index (the reference's tie rule; -0 is made +0 first, so the two tie like any equal pair); NaN or j < 0 (no
// candidate) is key 0, below every candidate (-inf included). One 64-bit compare per step instead of NaN tests
// and a two-field compare (measured on an H200 with a globaltimer trace of the select launch before: ~7300
// cycles of ranking and ~4500 of merging per warp at 128K, B 128, k 8, in compare-and-shuffle chains; with the
// keys, in an interleaved A/B on an H200, the routing was 1.6-4.3 us shorter at every benchmark point, e.g. 512K
// 51.1 -> 46.9 us, 128K B 64 k 4 33.4 -> 29.9 us, with identical selections). Counting the chunks from the
// longest sequence's newest candidate, so that the first loads need not wait for lengths[b], measured equal
// (within 0.3 us) and was not kept.
typedef unsigned long long dsp_key;

__device__ __forceinline__ dsp_key dsp_make_key(float v, int j) {
    unsigned u = __float_as_uint(v);
    if (j < 0 || dec_isnan(v)) return 0ull;
    if ((u << 1) == 0u) u = 0u;                       // -0 -> +0
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);   // IEEE order as unsigned order
    return ((dsp_key)u << 32) | (unsigned)j;
}
__device__ __forceinline__ int dsp_key_block(dsp_key k) { return k ? (int)(unsigned)k : -1; }

// 64-bit keys through the warp's 32-bit shuffles.
__device__ __forceinline__ dsp_key dsp_pack(int lo, int hi) {
    return ((dsp_key)(unsigned)hi << 32) | (unsigned)lo;
}
__device__ __forceinline__ dsp_key dsp_shfl_xor(dsp_key k, int h) {
    return dsp_pack(__shfl_xor_sync(DEC_FULL, (int)(unsigned)k, h), __shfl_xor_sync(DEC_FULL, (int)(k >> 32), h));
}
__device__ __forceinline__ dsp_key dsp_shfl(dsp_key k, int src) {
    return dsp_pack(__shfl_sync(DEC_FULL, (int)(unsigned)k, src), __shfl_sync(DEC_FULL, (int)(k >> 32), src));
}
__device__ __forceinline__ dsp_key dsp_shfl_up(dsp_key k, unsigned d) {
    return dsp_pack(__shfl_up_sync(DEC_FULL, (int)(unsigned)k, d), __shfl_up_sync(DEC_FULL, (int)(k >> 32), d));
}

// Bitonic sort of the warp's 32 keys, best (largest) first at lane 0.
__device__ __forceinline__ void dsp_warp_sort(dsp_key& key, int lane) {
#pragma unroll
    for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll
        for (int h = k >> 1; h > 0; h >>= 1) {
            const dsp_key o = dsp_shfl_xor(key, h);
            // a run of k lanes with bit k clear is sorted best first, else worst first: the lower lane of a
            // pair keeps the better entry exactly when the two agree
            const bool keep_better = ((lane & k) == 0) == ((lane & h) == 0);
            if (keep_better ? o > key : key > o) key = o;
        }
    }
}

// Offer the warp's 32 candidate keys c (0: none) to the sorted list lk of lcap >= 1 entries held one per lane
// (lane s: entry s, lanes >= lcap 0). One ballot finds the candidates that beat the last entry; each is then
// inserted at its rank, the lanes behind it taking their predecessor's entry (the last one drops out). A
// candidate that an earlier insertion outranked finds no lane behind it and changes nothing.
__device__ __forceinline__ void dsp_offer(dsp_key& lk, dsp_key c, int lcap, int lane) {
    const dsp_key t = dsp_shfl(lk, lcap - 1);
    unsigned mask = __ballot_sync(DEC_FULL, c > t);
    while (mask) {
        const int src = __ffs(mask) - 1;
        mask &= mask - 1u;
        const dsp_key ck = dsp_shfl(c, src);
        const dsp_key pk = dsp_shfl_up(lk, 1);
        const bool behind = lane < lcap && ck > lk;
        const unsigned m = __ballot_sync(DEC_FULL, behind);
        if (behind) lk = (m & ((1u << lane) - 1u)) == 0u ? ck : pk;  // the candidate's rank, or shifted down
    }
}

// ---- routing, 1: scores ----

// What the score pass streams per block (dsp_ld_row): fp32 sums S_j by float4 loads (dec_ld_stream, or the same
// load with an L2 prefetch size hint: build option), or with MOBA_DECODE_CENTROIDS_INPUT=1 the cache's block means
// T(S_j / B): 8-byte loads of four elements, their bits held in x and y of the float4 that the fp32 path loads into
// and widened to fp32 in place once they have landed (exact), so both builds keep one register array; the scores are
// those of the fp32 sums rounded in the kernel, from half the bytes.
#if MOBA_DECODE_CENTROIDS_INPUT
#if DSP_SCORE_L2_PREFETCH
#error "DSP_SCORE_L2_PREFETCH is a build option of the fp32 score pass"
#endif
template <typename T>
using dsp_row_t = T;
using dsp_src_t = uint2;
__device__ __forceinline__ float4 dsp_ld_row(const uint2* p) {
    const uint2 u = dec_ld_stream(p);
    return make_float4(__uint_as_float(u.x), __uint_as_float(u.y), 0.f, 0.f);
}
template <typename T>
__device__ __forceinline__ float4 dsp_widen(float4 raw) {
    float4 f;
    dec_unpack2(__float_as_uint(raw.x), f.x, f.y, T());
    dec_unpack2(__float_as_uint(raw.y), f.z, f.w, T());
    return f;
}
#else
template <typename T>
using dsp_row_t = float;
using dsp_src_t = float4;
#if DSP_SCORE_L2_PREFETCH && !defined(DEC_HOST_EMULATION)
__device__ __forceinline__ float4 dsp_ld_row(const float4* p) {
    float4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::" DSP_STR(DSP_SCORE_L2_PREFETCH) "B.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}
#else
__device__ __forceinline__ float4 dsp_ld_row(const float4* p) { return dec_ld_stream(p); }
#endif
#endif

// Block sums of one score batch of a warp (DSP_SCORE_LOADS float4 loads per lane, 8 lanes per block sum): 16 at
// d 128, 32 at d 64; a batch top covers that many blocks of a row.
__host__ __device__ constexpr int dsp_score_batch(int d) { return 4 * (DSP_SCORE_LOADS / (d / 32)); }

// Shared memory: [flags] own [rpg] | (16-byte aligned) qs [rpg][D] fp32.
template <typename T, int D, bool TOPS>
__device__ __forceinline__ void dsp_score(const T* __restrict__ q, const dsp_row_t<T>* __restrict__ sums,
                                          const int* __restrict__ lengths, float* __restrict__ scores, int q_len,
                                          int heads, int kv_heads, int n_blocks_cap, int block_size, int n_rg,
                                          int rpg, int n_range, int range_blocks, int n_cols,
                                          float* __restrict__ tops, int n_bat, unsigned* __restrict__ released) {
    constexpr int NV = D / 32;                  // float4 vectors of one lane's slice of a block sum
    constexpr int NP = DSP_SCORE_LOADS / NV;    // block sums per lane and batch
    constexpr int BW = 4 * NP;                  // block sums per warp batch (4 per pass of 8 lanes each)
    static_assert(BW == dsp_score_batch(D), "one batch size for the score pass and the selection from its tops");
    static_assert(NP <= 8 && NP * NV == DSP_SCORE_LOADS, "a batch slot per lane part");
    DEC_DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int item = blockIdx.x;
    const int grp = item / n_range, x = item - grp * n_range;  // grp = (b * kv_heads + kvh) * n_rg + rg
    const int rg = grp % n_rg, bk = grp / n_rg, kvh = bk % kv_heads, b = bk / kv_heads;
    const int group = heads / kv_heads, rows = group * q_len;
    const int r0 = rg * rpg, nr = min(rpg, rows - r0);
    DSP_RT_STAMP(dsp_score_trace, 0);
    const int len = lengths[b];
    const int c_last = (len - 1) / block_size;  // own block of the last query: candidates lie below it
    const int j_lo = x * range_blocks, j_hi = min(j_lo + range_blocks, c_last);
    DSP_RT_STAMP(dsp_score_trace, 1);
    if (j_lo >= j_hi) {  // the whole CTA: beyond this sequence's candidates
        DSP_RT_STAMP(dsp_score_trace, 2);
        DSP_RT_STAMP(dsp_score_trace, 3);
        if (DSP_OWN_WAIT && released != nullptr && tid == 0) dec_release_add(released + bk);
        return;
    }

    int* own = reinterpret_cast<int*>(smem + DSP_FLAGS);
    float* qs = reinterpret_cast<float*>(smem + dec_align16(DSP_FLAGS + 4 * rpg));
    const dsp_row_t<T>* bsum = sums + (long long)bk * n_blocks_cap * D;
    const int sub = lane >> 3, part = lane & 7;
    // Lane (sub, part) holds the 4-element vectors m * 8 + part of block rows base + p * 4 + sub (clamped into the
    // range: the loads stay unconditional, the stores are guarded).
    float4 sv[NP][NV];
    auto load = [&](int base) {
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            const int jb = min(base + p * 4 + sub, j_hi - 1);
            const dsp_src_t* src = reinterpret_cast<const dsp_src_t*>(bsum + (long long)jb * D);
#pragma unroll
            for (int m = 0; m < NV; ++m) sv[p][m] = dsp_ld_row(src + m * 8 + part);
        }
    };
    int base = j_lo + warp * BW;
    if (base < j_hi) load(base);
    // Own blocks and query rows after the first batch's loads are issued: their loads wait behind them.
    for (int rr = tid; rr < nr; rr += DSP_THREADS) own[rr] = (len - q_len + (r0 + rr) / group) / block_size;
    for (int y = tid; y < nr * D; y += DSP_THREADS) {
        const int rr = y / D, e = y - rr * D, r = r0 + rr, i = r / group, g = r - i * group;
        qs[y] = dec_to_float(q[((long long)(b * q_len + i) * heads + kvh * group + g) * D + e]);
    }
    __syncthreads();  // the only barrier: from here every warp streams its batches on its own

    float* srow = scores + ((long long)bk * rows + r0) * n_cols;
    for (; base < j_hi; base += DSP_WARPS * BW) {
        const int j = base + part * 4 + sub;  // the block whose score this lane stores (part < NP)
        const bool store = part < NP && j < j_hi;
#if MOBA_DECODE_CENTROIDS_INPUT  // once per batch, after its loads have landed
#pragma unroll
        for (int p = 0; p < NP; ++p) {
#pragma unroll
            for (int m = 0; m < NV; ++m) sv[p][m] = dsp_widen<T>(sv[p][m]);
        }
#endif
        float poison[NP];  // NaN where this lane's part of block row p's sum is not finite
#pragma unroll
        for (int p = 0; p < NP; ++p) {
            poison[p] = 0.f;
#pragma unroll
            for (int m = 0; m < NV; ++m) poison[p] = dec_poison_nonfinite(sv[p][m], poison[p]);
        }
        for (int rr = 0; rr < nr; ++rr) {
            float4 qv[NV];
#pragma unroll
            for (int m = 0; m < NV; ++m) qv[m] = *reinterpret_cast<const float4*>(qs + rr * D + (m * 8 + part) * 4);
            float acc[NP];
#pragma unroll
            for (int p = 0; p < NP; ++p) {
                acc[p] = poison[p];  // carried to the whole score by the butterfly below
#pragma unroll
                for (int m = 0; m < NV; ++m)
                    acc[p] += qv[m].x * sv[p][m].x + qv[m].y * sv[p][m].y + qv[m].z * sv[p][m].z + qv[m].w * sv[p][m].w;
            }
#pragma unroll
            for (int off = 1; off < 8; off <<= 1) {
#pragma unroll
                for (int p = 0; p < NP; ++p) acc[p] += __shfl_xor_sync(DEC_FULL, acc[p], off);
            }
            float mine = acc[0];
#pragma unroll
            for (int p = 1; p < NP; ++p) mine = part == p ? acc[p] : mine;
            if (store) srow[(long long)rr * n_cols + j] = j < own[rr] ? mine : dec_nan();
            if constexpr (TOPS) {  // the batch's top: its candidates' largest score (every lane of a sub holds
                float top = dec_nan();  // its acc; fmaxf skips NaN, so NaN only where there is no candidate)
#pragma unroll
                for (int p = 0; p < NP; ++p) top = base + p * 4 + sub < own[rr] ? fmaxf(top, acc[p]) : top;
                top = fmaxf(top, __shfl_xor_sync(DEC_FULL, top, 8));
                top = fmaxf(top, __shfl_xor_sync(DEC_FULL, top, 16));
                if (lane == 0) tops[((long long)bk * rows + r0 + rr) * n_bat + base / BW] = top;
            }
        }
#if DSP_ROUTE_TRACE
        if (base == j_lo + warp * BW) DSP_RT_STAMP(dsp_score_trace, 2);
#endif
        if (base + DSP_WARPS * BW < j_hi) load(base + DSP_WARPS * BW);
    }
#if DSP_ROUTE_TRACE
    __syncthreads();
    DSP_RT_STAMP(dsp_score_trace, 3);
    if (tid == 0 && blockIdx.x < DSP_ROUTE_TRACE_CTAS) {
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        dsp_score_trace[blockIdx.x][4] = smid;
    }
#endif
    if (DSP_OWN_WAIT && released != nullptr) {  // this CTA's scores and tops are written: one release of its kv head
        __syncthreads();
        if (tid == 0) dec_release_add(released + bk);
    }
}

// ---- the set of selected blocks of a kv head ----

// A bitmap of n_words 32-bit words (bit j: block j is selected by some row of the kv head). Rows of one kv head
// enter their blocks concurrently by atomicOr, so the set, and the ascending block order in which the attention
// launch numbers its blocks, do not depend on the order of the entries (an open-addressing table numbered in slot
// order did: where blocks collided, the slot order, and with it which chunks of a block one CTA folds together,
// changed run to run, and the outputs' last bits with it). The attention launch reads the set and its last CTA of
// the kv head empties it again.
__device__ __forceinline__ void dsp_set_insert(int* set, int j) {
    atomicOr(reinterpret_cast<unsigned*>(set) + (j >> 5), 1u << (j & 31));
}

// ---- routing, 2: selection ----

// Shared memory: the warps' lists, [WARPS][32] 64-bit keys.
__device__ __forceinline__ void dsp_select(const float* __restrict__ scores, const int* __restrict__ lengths,
                                           int* __restrict__ sel, int* __restrict__ table, int q_len, int heads,
                                           int kv_heads, int block_size, int top_k, int n_cols, int n_words,
                                           int wpr) {
    constexpr int U = DSP_SELECT_LOADS;
    DEC_DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = heads / kv_heads, rows = group * q_len;
    // wpr warps per row (a power of two), WARPS / wpr rows per CTA: few candidates, one warp and no merging
    const int rpc = DSP_WARPS / wpr, n_rg = (rows + rpc - 1) / rpc;
    const int item = blockIdx.x, rg = item % n_rg, bk = item / n_rg, kvh = bk % kv_heads, b = bk / kv_heads;
    DSP_RT_STAMP(dsp_select_trace, 0);
    const int wl = warp & (wpr - 1), r = rg * rpc + warp / wpr;  // this warp's place in its row; its row
    const bool has_row = r < rows;
    const int i = r / group, g = r - i * group;
    const int own = (lengths[b] - q_len + i) / block_size;
    const int lcap = top_k - 1;
    const int n = lcap > 0 && has_row ? own : 0;  // candidates: blocks 0 .. own - 1
    const float* src = scores + ((long long)bk * rows + (has_row ? r : 0)) * n_cols;

    dsp_key lk = 0;  // this lane's entry of the warp's list
    const int nch = (n + 31) / 32;
    const int STEP = wpr * U;  // chunks of one round of the row's warps
    // Round c0 of warp w: chunks c0 + u * wpr, u < U; the next round's loads are issued before this one is
    // ranked (two register buffers), so long rows stream instead of waiting once per round.
    auto load = [&](float (&v)[U], int c0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * wpr, j = n - 1 - 32 * c - lane;
            v[u] = c < nch && j >= 0 ? src[j] : dec_nan();
        }
    };
    bool fresh = true;  // warp-uniform: no chunk ranked yet
    // Candidate u of this lane in round c0 as a key (0 when there is none). Recomputed where it is needed rather
    // than kept: an array of U keys would cost 2 U registers, and at the 64 of 4 CTAs per SM it spills.
    auto cand = [&](const float (&v)[U], int c0, int u) {
        const int c = c0 + u * wpr, j = n - 1 - 32 * c - lane;
        return dsp_make_key(v[u], c < nch ? j : -1);
    };
    // The first round: each lane's best candidate (no shuffles), the lanes' bests sorted by one warp bitonic sort
    // into the list, then only the candidates that beat the list's last entry offered, a round per candidate a
    // lane still holds. A lane whose best missed the list has nothing that beats it; on random scores a handful
    // of candidates remain, where offering every chunk inserted ~(k-1) ln(chunks) of them one by one.
    auto rank_first = [&](const float (&v)[U], int c0) {
        dsp_key best = 0;
        int bu = -1;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const dsp_key ck = cand(v, c0, u);
            if (ck > best) {
                best = ck;
                bu = u;
            }
        }
        dsp_warp_sort(best, lane);
        lk = lane < lcap ? best : 0ull;
        const dsp_key t = dsp_shfl(lk, lcap - 1);
        unsigned left = 0u;  // this lane's other candidates that beat the list's last entry
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (u != bu && cand(v, c0, u) > t) left |= 1u << u;
        while (__any_sync(DEC_FULL, left != 0u)) {
            dsp_key ok = 0;
            const int pick = __ffs(left) - 1;  // -1: none left
            left &= left - 1u;
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (u == pick) ok = cand(v, c0, u);
            dsp_offer(lk, ok, lcap, lane);
        }
    };
    auto rank = [&](const float (&v)[U], int c0) {
        if (fresh) {
            rank_first(v, c0);
            fresh = false;
            return;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c0 + u * wpr >= nch) break;
            dsp_offer(lk, cand(v, c0, u), lcap, lane);
        }
    };
    {
        float va[U], vb[U];
        if (wl < nch) load(va, wl);
        for (int c0 = wl; c0 < nch; c0 += 2 * STEP) {
            if (c0 + STEP < nch) load(vb, c0 + STEP);
            rank(va, c0);
            if (c0 + STEP < nch) {
                if (c0 + 2 * STEP < nch) load(va, c0 + 2 * STEP);
                rank(vb, c0 + STEP);
            }
        }
    }
    dsp_key* wk = reinterpret_cast<dsp_key*>(smem);
    // A row's warps' lists merged pairwise in a tree (log2 wpr levels, no serial insertions): a list and its
    // partner's, reversed, give the best 32 of both lane by lane as a bitonic sequence, which 5 half-cleaner
    // steps sort best first. Lists hold distinct blocks, so the result is the same strict order's best k-1.
    for (int step = 1; step < wpr; step <<= 1) {
        if ((wl & (2 * step - 1)) == step) wk[tid] = lk;  // this level's senders (read by no one before it)
        __syncthreads();
        if ((wl & (2 * step - 1)) == 0) {
            const dsp_key pk = wk[(warp + step) * 32 + 31 - lane];
            if (pk > lk) lk = pk;
#pragma unroll
            for (int h = 16; h > 0; h >>= 1) {
                const dsp_key o = dsp_shfl_xor(lk, h);
                if ((lane & h) == 0 ? o > lk : lk > o) lk = o;
            }
        }
    }
    const int lj = dsp_key_block(lk);
    if (wl != 0 || !has_row) return;
    int* srow = sel + (((long long)b * q_len + i) * heads + kvh * group + g) * top_k;
    if (lane == 0) srow[0] = own;
    if (lane < lcap) srow[1 + lane] = lj;
    // The row's blocks into the kv head's set of selected blocks (n_words 0: no set, routing measured alone).
    const int prev = __shfl_up_sync(DEC_FULL, lj, 1);
    const int jj = lane == 0 ? own : (lane < top_k ? prev : -1);
    if (n_words > 0 && jj >= 0) dsp_set_insert(table + (long long)bk * n_words, jj);
    DSP_RT_STAMP(dsp_select_trace, 1);  // thread 0: its row's first warp, which writes last
}

// A score or batch top of the score launch: after griddepcontrol.wait any load (the launch has completed); after the
// kv head's release counter (DSP_OWN_WAIT) from L2 (decode_common.cuh, release counters).
__device__ __forceinline__ float dsp_ld_score(const float* p) {
#if DSP_OWN_WAIT
    return dec_ldcg(p);
#else
    return *p;
#endif
}

// The trace build's laps of a row selection: tr holds the clock at the last lap, then the four laps' cycles.
#if DSP_ATTN_TRACE
#define DSP_SEL_LAP(i)                                                \
    do {                                                              \
        const long long now_ = clock64();                             \
        tr[1 + (i)] += (unsigned long long)(now_ - (long long)tr[0]); \
        tr[0] = (unsigned long long)now_;                             \
    } while (0)
#else
#define DSP_SEL_LAP(i) do { } while (0)
#endif

// One row's selection from the batch tops (the score pass's largest candidate score of every batch of bw consecutive
// blocks of a row, NaN for none), by one warp, no barrier: the row's best k-1 of its n candidates as a sorted list
// one key per lane (lanes >= lcap: 0). Level 1 ranks the row's batches by (top desc, batch desc) (batch 32 c + lane
// of chunk c, 8 chunks loaded together; the first 8, t0, loaded by the caller) into the best k-1; level 2 ranks
// every candidate of those batches (at most (k-1) bw) by (score desc, block desc), dsp_select's order, so the same
// selection. Exact: let x be one of the true best k-1, in batch c. Were c not among the best k-1 batches, k-1 other
// batches would rank above it, each holding a candidate y with score(y) = its top >= top(c) >= score(x), and where
// the scores are equal, a higher batch and so a higher block: k-1 candidates above x.
__device__ __forceinline__ dsp_key dsp_select_row_tops(const float* __restrict__ src, const float* __restrict__ tsrc,
                                                       const float (&t0)[DSP_SELECT_LOADS], int n, int bw, int lcap,
                                                       int lane, [[maybe_unused]] unsigned long long* tr) {
    constexpr int U = DSP_SELECT_LOADS;
    // Keys of U chunks of 32 ranked into the sorted list lk (lane s: entry s): the first time, each lane's best by
    // one warp sort and then the lane's others that beat the list's last entry; later, every chunk offered.
    auto rank = [&](dsp_key& lk, bool& fresh, const dsp_key (&kv)[U]) {
        if (!fresh) {
#pragma unroll
            for (int u = 0; u < U; ++u) dsp_offer(lk, kv[u], lcap, lane);
            return;
        }
        fresh = false;
        dsp_key best = 0;
        int bu = -1;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (kv[u] > best) {
                best = kv[u];
                bu = u;
            }
        }
        dsp_warp_sort(best, lane);
        lk = lane < lcap ? best : 0ull;
        const dsp_key t = dsp_shfl(lk, lcap - 1);
        unsigned left = 0u;
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (u != bu && kv[u] > t) left |= 1u << u;
        while (__any_sync(DEC_FULL, left != 0u)) {
            dsp_key ok = 0;
            const int pick = __ffs(left) - 1;
            left &= left - 1u;
#pragma unroll
            for (int u = 0; u < U; ++u)
                if (u == pick) ok = kv[u];
            dsp_offer(lk, ok, lcap, lane);
        }
    };
    if (lcap == 0 || n == 0) return 0ull;
    // Level 1: batch t = 32 c + lane of chunk c.
    const int nb = (n + bw - 1) / bw;
    dsp_key lt = 0;
    bool fresh = true;
    for (int c0 = 0; c0 < (nb + 31) / 32; c0 += U) {
        dsp_key kv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = 32 * (c0 + u) + lane;
            kv[u] = t < nb ? dsp_make_key(c0 == 0 ? t0[u] : dsp_ld_score(tsrc + t), t) : 0ull;
        }
        DSP_SEL_LAP(0);
        rank(lt, fresh, kv);
        DSP_SEL_LAP(1);
    }
    // Level 2: value v = 32 c + lane is candidate v % bw of the (v / bw)-th batch of the list.
    const int tb = dsp_key_block(lt);  // this lane's batch (lanes beyond the list: none)
    const int nsel = __popc(__ballot_sync(DEC_FULL, lane < lcap && lt != 0ull));
    dsp_key lk = 0;
    fresh = true;
    for (int c0 = 0; c0 < (nsel * bw + 31) / 32; c0 += U) {
        dsp_key kv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = 32 * (c0 + u) + lane, sl = v / bw;
            const int t = __shfl_sync(DEC_FULL, tb, sl & 31);
            const int j = t * bw + (v - sl * bw);
            kv[u] = sl < nsel && j < n ? dsp_make_key(dsp_ld_score(src + j), j) : 0ull;
        }
        DSP_SEL_LAP(2);
        rank(lk, fresh, kv);
        DSP_SEL_LAP(3);
    }
    return lk;
}

// ---- attention ----

// The K / V copies: dec_cp_async16, or the same copy with an L2 prefetch size hint (build option).
#if DSP_ATTN_L2_PREFETCH && !defined(DEC_HOST_EMULATION)
__device__ __forceinline__ void dsp_cp_async16(void* smem, const void* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global.L2::" DSP_STR(DSP_ATTN_L2_PREFETCH) "B [%0], [%1], 16;\n" ::"r"(s),
                 "l"(gmem)
                 : "memory");
}
#else
__device__ __forceinline__ void dsp_cp_async16(void* smem, const void* gmem) { dec_cp_async16(smem, gmem); }
#endif

// Tokens 0 .. chunk - 1 (chunk <= DSP_ATTN_CHUNK) of K and V at kb / vb into ks / vs ([chunk][D] each, 16-byte
// chunk c of row r stored at c ^ (r & 7): the 8 rows of an ldmatrix matrix hit 8 different bank groups) as
// 16-byte cp.async copies (THREADS threads, thread tid); rows from nvalid on are zero-filled, so that P = 0
// times V stays 0 beyond the sequence. A thread copies vector tid % (D / 8) of rows tid / (D / 8) + x * THREADS /
// (D / 8): the same swizzle and constant strides for every row it copies, so its addresses are immediates off two
// per-item bases. The caller commits the group.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void dsp_issue_kv_swizzled(T* ks, T* vs, const T* kb, const T* vb, int chunk, int nvalid,
                                                      int tid) {
    constexpr int VEC = D / 8, TPI = THREADS / VEC;  // 16-byte vectors per row; rows per pass of the CTA
    static_assert(TPI % 8 == 0, "a thread's rows share their swizzle");
    const int tk0 = tid / VEC, cv = tid - tk0 * VEC;
    const int goff = tk0 * D + cv * 8, soff = tk0 * D + ((cv ^ (tk0 & 7)) << 3);
    const T* kp = kb + goff;
    const T* vp = vb + goff;
    T* skp = ks + soff;
    T* svp = vs + soff;
#if DSP_ATTN_WHOLE_COPY
    if (nvalid == DSP_ATTN_CHUNK) {  // a whole item (chunk = DSP_ATTN_CHUNK): no per-row test, one base each
#pragma unroll
        for (int x = 0; x < DSP_ATTN_CHUNK / TPI; ++x) {
            dsp_cp_async16(skp + x * TPI * D, kp + x * TPI * D);
            dsp_cp_async16(svp + x * TPI * D, vp + x * TPI * D);
        }
        return;
    }
#endif
#pragma unroll
    // no early exit: every pass is straight-line code off the four bases
    for (int x = 0; x < DSP_ATTN_CHUNK / TPI; ++x) {
        const int tk = tk0 + x * TPI;
        if (tk < nvalid) {
            dsp_cp_async16(skp + x * TPI * D, kp + x * TPI * D);
            dsp_cp_async16(svp + x * TPI * D, vp + x * TPI * D);
        } else if (tk < chunk) {
            *reinterpret_cast<uint4*>(skp + x * TPI * D) = make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(svp + x * TPI * D) = make_uint4(0u, 0u, 0u, 0u);
        }
    }
}

// Element offset of 16-byte chunk ch of row r of a K or V stage of `chunk` rows, in the layout the build's copies
// write; rsw: a row with r's swizzle (r & 7). cp.async: rows of D elements, chunk ch at ch ^ (r & 7). Tensor maps:
// D / 64 boxes of [chunk][64] (128-byte rows, the copy engine's 128-byte swizzle: chunk ch & 7 of box ch >> 3 at
// (ch & 7) ^ (r & 7)).
template <int D>
__device__ __forceinline__ int dsp_stage_at(int r, int rsw, int ch, int chunk) {
#if DSP_ATTN_TMA
    return (ch >> 3) * chunk * 64 + r * 64 + (((ch & 7) ^ (rsw & 7)) << 3);
#else
    (void)chunk;
    return r * D + ((ch ^ (rsw & 7)) << 3);
#endif
}

// Shared memory: [flags] ublk [THREADS] (the window's selected blocks) | rl [R] (entries that selected the current
// block) rrow [R] (their rows) rpos [R] (their query positions) | (16-byte aligned, when cached) es [E] (the kv
// head's selection entries), (16-byte aligned) qc [R][D] T (its query rows) | (16-byte aligned) qs [ROWS][D] fp32 |
// red [WARPS][ROWS][D] fp32 (per-warp P.V sums) | wml [WARPS][ROWS][2] (per-warp max and sum) | (16-byte aligned)
// STAGES x (K [chunk][D] T, V [chunk][D] T), which the final merge's per-warp weights reuse.
// flags: [0] rows of the current block, [1] last CTA, [4 .. 4 + 2 WARPS) the windows' per-warp block counts.
// Tensor maps (DSP_ATTN_TMA): the stages come first (the copy engine's swizzle needs them 1 KB-aligned, and the
// dynamic shared memory starts so), each K or V stage D / 64 boxes of [chunk][64]; the stages' mbarriers sit in
// the flags from byte DSP_ATTN_BARS; the merge reuses the stages alone.
template <typename T, int D, bool PAGED, bool SELECT, typename SelPtr>
__device__ __forceinline__ void dsp_attend(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, const int* __restrict__ lengths,
                                           SelPtr __restrict__ sel, int* __restrict__ table,
                                           float* __restrict__ part_o, float* __restrict__ part_ml,
                                           unsigned* __restrict__ counters, T* __restrict__ out,
                                           float* __restrict__ lse, int q_len, int heads, int kv_heads,
                                           int capacity, int block_size, int top_k, int n_chunks, int chunk,
                                           int n_words, int cpg, int cached, float scale_log2,
                                           const float* __restrict__ scores, const float* __restrict__ tops,
                                           int n_cols, int n_bat, unsigned* __restrict__ released, int n_score,
                                           const int* __restrict__ page_table, int page_size, int pages_per_seq,
                                           const moba_tensor_map* kmap, const moba_tensor_map* vmap) {
    constexpr int CPL = D / 32;  // columns per lane in P.V and the merge
    constexpr int ROWS = DSP_ATTN_ROWS;
    constexpr int NW = DSP_ATTN_WARPS;
    constexpr int NT = DSP_ATTN_THREADS;
    constexpr int NST = DSP_ATTN_STAGES;
    constexpr int QSD = D + 8;  // padded q rows: the 4 rows of an A fragment load hit different banks
    constexpr int TPW = DSP_ATTN_CHUNK / NW;  // tokens of an item per warp
    static_assert(TPW == 8 || TPW == 16, "a warp takes 8 or 16 tokens of a chunk");
    DEC_DYNAMIC_SMEM(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = heads / kv_heads, R = group * q_len, E = R * top_k, nc = n_chunks;
    const int lnc = __ffs(nc) - 1;  // n_chunks = B / chunk is a power of two
    const int g = blockIdx.x / cpg, part = blockIdx.x - g * cpg;  // g = b * kv_heads + kvh
    const int b = g / kv_heads, kvh = g - b * kv_heads;
    const int len = lengths[b];
    int* tab = table + (long long)g * n_words;
    // The selection inside this launch (SELECT; cached): every CTA of the kv head selects its rows' blocks
    // itself (the same result in each) and enters them all into the kv head's set, so that after its own entries
    // the set is whole whatever the other CTAs have done (they enter the same blocks).
#if DSP_ATTN_TRACE
    long long tr_clock = clock64();
    unsigned long long tr_acc[16] = {};
    unsigned long long tr_g[4] = {dsp_gtime(), 0ull, 0ull, 0ull};
    unsigned tr_n[2] = {0u, 0u};
    auto tr_flush = [&](int last) {
        if (tid != 0) return;
        unsigned smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        unsigned long long* o = dsp_trace[blockIdx.x];
        for (int x = 0; x < 8; ++x) o[x] = tr_acc[x];
        for (int x = 0; x < 4; ++x) o[8 + x] = tr_g[x];
        o[12] = tr_n[0];
        o[13] = tr_n[1];
        o[14] = smid;
        o[15] = last;
        for (int x = 0; x < 8; ++x) o[16 + x] = tr_acc[8 + x];
    };
#endif

#if DSP_ATTN_TMA
    T* const stages = reinterpret_cast<T*>(smem);
    unsigned char* const head = smem + NST * 2 * chunk * D * (int)sizeof(T);
    unsigned long long* const bars = reinterpret_cast<unsigned long long*>(head + DSP_ATTN_BARS);
    static_assert(4 * (4 + 2 * NW) <= DSP_ATTN_BARS && DSP_ATTN_BARS + 8 * NST <= DSP_FLAGS,
                  "the stages' mbarriers after the flags, within DSP_FLAGS bytes");
    if (tid == 0) {
#ifndef DEC_HOST_EMULATION
        if (moba::smem_u32(stages) & 1023u) __trap();  // the swizzle's 1 KB alignment (see above)
#endif
        for (int x = 0; x < NST; ++x) dec_mbar_init(bars + x, 1u);  // used after the first CTA barrier below
    }
#else
    unsigned char* const head = smem;
    (void)kmap;
    (void)vmap;
#endif
    int* flags = reinterpret_cast<int*>(head);
    int* ublk = reinterpret_cast<int*>(head + DSP_FLAGS);
    int* rl = ublk + NT;
    int* rrow = rl + R;
    int* rpos = rrow + R;
    unsigned char* after_rows = head + dec_align16(DSP_FLAGS + 4 * (NT + 3 * R));
    int* es = reinterpret_cast<int*>(after_rows);
    T* qc = reinterpret_cast<T*>(after_rows + dec_align16(4 * E));
    T* qs = reinterpret_cast<T*>(after_rows + (cached ? dec_align16(4 * E) + 2 * R * D : 0));
    float* red = reinterpret_cast<float*>(qs + ROWS * QSD);
    float* wml = red + NW * ROWS * D;
#if !DSP_ATTN_TMA
    T* stages = reinterpret_cast<T*>(wml + NW * ROWS * 2);
#endif

    const long long sel_b = (long long)b * q_len * heads;
    auto sel_global = [&](int ee) {  // entry ee of this kv head (written by the routing launch)
        const int r = ee / top_k, s = ee - r * top_k, i = r / group, gg = r - i * group;
        return sel[(sel_b + (long long)i * heads + kvh * group + gg) * top_k + s];
    };
    auto sel_at = [&](int ee) { return cached ? es[ee] : sel_global(ee); };
    auto q_row = [&](int r) {  // query row r of this kv head in q
        const int i = r / group, gg = r - i * group;
        return q + ((long long)(b * q_len + i) * heads + kvh * group + gg) * D;
    };
    auto stage_q_rows = [&] {  // the kv head's query rows into qc (cached), once for all its blocks
        for (int y = tid; y < R * (D / 8); y += NT) {
            const int r = y / (D / 8), x = y - r * (D / 8);
            reinterpret_cast<uint4*>(qc + r * D)[x] = reinterpret_cast<const uint4*>(q_row(r))[x];
        }
    };
    if constexpr (SELECT) {
        // A dependent launch (the score launch's CTAs let it start as they leave): the kv head's query rows first,
        // then the wait for the scores and tops.
        stage_q_rows();
        DSP_TR_LAP(8);
#if DSP_OWN_WAIT
        // only this kv head's score CTAs: its selection may start while other kv heads' are still streaming
        if (tid == 0) dec_wait_at_least(released + g, (unsigned)n_score);
        __syncthreads();
#else
        dec_grid_wait();
#endif
        DSP_TR_LAP(9);
        const int lcap = top_k - 1;
        for (int r = warp; r < R; r += NW) {
            const int i = r / group, gg = r - i * group, own = (len - q_len + i) / block_size;
            const long long row = (long long)g * R + r;
            float t0[DSP_SELECT_LOADS];  // the row's first round of batch tops
#pragma unroll
            for (int u = 0; u < DSP_SELECT_LOADS; ++u)
                t0[u] = 32 * u + lane < n_bat ? dsp_ld_score(tops + row * n_bat + 32 * u + lane) : 0.f;
#if DSP_ATTN_TRACE
            unsigned long long tr_sel[5] = {(unsigned long long)tr_clock, 0ull, 0ull, 0ull, 0ull};
#else
            unsigned long long* const tr_sel = nullptr;
#endif
            const int lj = dsp_key_block(dsp_select_row_tops(scores + row * n_cols, tops + row * n_bat, t0,
                                                             lcap > 0 ? own : 0, dsp_score_batch(D), lcap,
                                                             lane, tr_sel));
            if (r == warp) {  // the first row: slot 18, and its split into slots 20 .. 23
#if DSP_ATTN_TRACE
                for (int x = 0; x < 4; ++x) tr_acc[12 + x] += tr_sel[1 + x];
#endif
                DSP_TR_LAP(10);
            }
            const int prev = __shfl_up_sync(DEC_FULL, lj, 1);
            const int jj = lane == 0 ? own : (lane < top_k ? prev : -1);  // entry s = lane of the row
            if (lane < top_k) {
                es[r * top_k + lane] = jj;
                if (part == 0) sel[(sel_b + (long long)i * heads + kvh * group + gg) * top_k + lane] = jj;
                if (jj >= 0) dsp_set_insert(tab, jj);
            }
        }
        __syncthreads();
        DSP_TR_LAP(11);
    }
    if constexpr (!SELECT) {
        if (cached) {  // the kv head's entries and query rows, once for all its blocks
            for (int ee = tid; ee < E; ee += NT) es[ee] = sel_global(ee);
            stage_q_rows();
        }
    }
    if (tid == 0) flags[0] = 0;

    // Items: chunk c of the u-th selected block of a batch is item u * nc + c. The set is read in windows of
    // THREADS words; a window's blocks are numbered in ascending order and taken in batches of at most THREADS
    // blocks (a window without blocks: one empty batch); CTA part takes a contiguous run of each batch's items
    // (so consecutive items mostly share a block, whose rows are then gathered once). The window's per-warp
    // block counts alternate between two halves of flags, so that a warp ahead in the next window cannot
    // overwrite counts another warp still reads; a thread's word is read again for each batch rather than held
    // across the items (registers are what limits this kernel).
    auto window_total = [&](const int* wcount) {
        int total = 0;
#pragma unroll
        for (int w = 0; w < NW; ++w) total += wcount[w];
        return total;
    };
    // Items computed in earlier batches: a stage's k-th use waits for phase k of its mbarrier (tensor maps).
    [[maybe_unused]] int nbase = 0;
    for (int w0 = 0, r0 = 0; w0 < n_words;) {
        int* wcount = flags + 4 + ((w0 / NT) & 1) * NW;
        const unsigned word = w0 + tid < n_words ? static_cast<unsigned>(dec_ldcg(tab + w0 + tid)) : 0u;
        int first = __popc(word);  // inclusive scan of the counts over the warp, then the exclusive rank
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(DEC_FULL, first, o);
            if (lane >= o) first += y;
        }
        if (r0 == 0) {
            if (lane == 31) wcount[warp] = first;
            __syncthreads();  // also: es / qc and flags[0] written, the previous batch's items done with ublk
        }
        first -= __popc(word);
#pragma unroll
        for (int w = 0; w < NW; ++w) first += w < warp ? wcount[w] : 0;
        if (word != 0u && first < r0 + NT && first + __popc(word) > r0) {
            unsigned m = word;
            for (int rank = first; m != 0u; ++rank, m &= m - 1u)
                if (rank >= r0 && rank < r0 + NT) ublk[rank - r0] = (w0 + tid) * 32 + __ffs(m) - 1;
        }
        __syncthreads();
        const int nu = min(NT, window_total(wcount) - r0);

        const int n_it = nu * nc, nwa = chunk / TPW;  // warps with TPW tokens of a chunk each (chunk >= 16)
        const int lo = (int)((long long)part * n_it / cpg), hi = (int)((long long)(part + 1) * n_it / cpg);
        auto issue = [&](int it, int st) {  // K and V of item it into stage st, one commit group (or mbarrier phase)
#if DSP_ATTN_TMA
            if (tid != 0) return;
#endif
            const int j = ublk[it >> lnc], tok0 = j * block_size + (it & (nc - 1)) * chunk;
            const int nvalid = max(0, min(chunk, len - tok0));
            T* ks = stages + st * 2 * chunk * D;
            long long src;
            if constexpr (PAGED) {  // a page holds whole blocks: the chunk's tokens lie in one page
                const int pi = tok0 / page_size;
                src = (((long long)page_table[(long long)b * pages_per_seq + pi] * kv_heads + kvh) * page_size +
                       (tok0 - pi * page_size)) * D;
            } else {
                src = ((long long)g * capacity + tok0) * D;
            }
#if DSP_ATTN_TMA
            // Whole boxes of chunk rows (rows beyond L are zeroed after the wait; beyond the tensor the copy engine
            // fills zeros); row src / D of the tensor viewed as (rows, D).
            (void)nvalid;
            dec_mbar_arrive_tx(bars + st, DSP_ATTN_PROBE == 2 ? 0u : (unsigned)(2 * chunk * D * (int)sizeof(T)));
            if (DSP_ATTN_PROBE != 2) {
                const int row = (int)(src / D);
#pragma unroll
                for (int h = 0; h < D / 64; ++h) {
                    dec_tma_load_2d(ks + h * chunk * 64, kmap, h * 64, row, bars + st);
                    dec_tma_load_2d(ks + chunk * D + h * chunk * 64, vmap, h * 64, row, bars + st);
                }
            }
#else
            if (DSP_ATTN_PROBE != 2)
                dsp_issue_kv_swizzled<T, D, NT>(ks, ks + chunk * D, k + src, v + src, chunk, nvalid, tid);
            dec_cp_async_commit();
#endif
        };
        DSP_TR_LAP(0);
#if DSP_ATTN_TRACE
        if (tr_g[1] == 0ull) DSP_TR_STAMP(1);  // the first batch's start
#endif
        // Up to NST - 1 items in flight while one is computed.
#pragma unroll
        for (int x = 0; x < NST - 1; ++x)
            if (lo + x < hi) issue(lo + x, (nbase + x) % NST);
        int prev_j = -1, nrow = 0;
        // A run: consecutive items of one block. With at most ROWS rows (one pass) a thread keeps its row's
        // running (max, sum, o) of the run in registers and writes one partial, into the slot of the run's
        // first chunk (the run's other chunk slots get m = -inf: weight 0 in the merge).
        float4 run_o = make_float4(0.f, 0.f, 0.f, 0.f);
        float run_m = dec_neg_inf(), run_l = 0.f;
        int run_c = 0;
        for (int it = lo, n = 0; it < hi; ++it, ++n) {
            // The stage of item n - 1 is free: every thread is past that item's P.V barrier.
            DSP_TR_LAP(6);
            DSP_TR_ADD(0, 1u);
            const int sn = nbase + n;  // this item's use of the stages, counted over the batches
            if (it + NST - 1 < hi) issue(it + NST - 1, (sn + NST - 1) % NST);
            DSP_TR_LAP(1);
            const int c = it & (nc - 1), j = ublk[it >> lnc];
            const T* ks = stages + (long long)(sn % NST) * 2 * chunk * D;
            const T* vs = ks + chunk * D;
            if (j != prev_j) {  // the entries that selected j (a row selects a block at most once: <= R)
                __syncthreads();  // the last item is done with rl, rrow, rpos; flags[0] is 0
                for (int ee = tid; ee < E; ee += NT) {
                    if (sel_at(ee) == j) {
                        const int n_r = atomicAdd(flags, 1), r = ee / top_k;
                        rl[n_r] = ee;
                        rrow[n_r] = r;
                        rpos[n_r] = len - q_len + r / group;
                    }
                }
                __syncthreads();
                nrow = flags[0];
                prev_j = j;
                DSP_TR_ADD(1, 1u);
            }
            DSP_TR_LAP(2);
            // Wait for this item's group: the ones issued after it (up to NST - 1) may stay in flight. Not
            // dec_cp_async_wait_n: its switch over 0 .. 6 compiles to other code in the measured item loop.
            static_assert(NST >= 2 && NST <= 4, "one to three items in flight behind the current one");
#if DSP_ATTN_TMA
            dec_mbar_wait(bars + sn % NST, (unsigned)(sn / NST) & 1u);
#else
            const int behind = min(NST - 1, hi - 1 - it);
            if (NST > 3 && behind >= 3)
                dec_cp_async_wait<(NST > 3 ? 3 : 0)>();
            else if (NST > 2 && behind == 2)
                dec_cp_async_wait<(NST > 2 ? 2 : 0)>();
            else if (behind == 1)
                dec_cp_async_wait<1>();
            else
                dec_cp_async_wait<0>();
#endif
            DSP_TR_LAP(3);
            const int tok0 = j * block_size + c * chunk;
#if DSP_ATTN_TMA
            if (len - tok0 < chunk) {  // V rows beyond L: zeros (P = 0 times V stays 0), before the pass's barrier
                const int z0 = max(0, len - tok0);
                T* vz = const_cast<T*>(vs);
                for (int y = tid; y < (chunk - z0) * (D / 8); y += NT) {
                    const int r = z0 + y / (D / 8), ch = y - (r - z0) * (D / 8);
                    *reinterpret_cast<uint4*>(vz + (ch >> 3) * chunk * 64 + r * 64 + ((ch & 7) << 3)) =
                        make_uint4(0u, 0u, 0u, 0u);
                }
                dec_fence_proxy_async();  // before a later copy into this stage
            }
#endif
            const long long pbase = (long long)g * E * nc + c;  // partial of entry ent: pbase + ent * nc
            const bool run_first = it == lo || ((it - 1) >> lnc) != (it >> lnc);
            const bool run_last = it + 1 >= hi || ((it + 1) >> lnc) != (it >> lnc);
            const bool accum = nrow <= ROWS;  // one pass: this thread's (row, columns) are the same all run long
            if (run_first) run_c = c;
            for (int rb0 = 0; rb0 < nrow; rb0 += ROWS) {
                const int nb = min(ROWS, nrow - rb0);
                for (int y = tid; y < nb * (D / 8); y += NT) {  // the pass's query rows, 16 bytes a thread
                    const int rr = y / (D / 8), x = y - rr * (D / 8), r = rrow[rb0 + rr];
                    const uint4 u = cached ? reinterpret_cast<const uint4*>(qc + r * D)[x]
                                           : reinterpret_cast<const uint4*>(q_row(r))[x];
                    *reinterpret_cast<uint4*>(qs + rr * QSD + x * 8) = u;
                }
                __syncthreads();  // qs written; every thread's copies of this item have landed; flags[0] read
                if (tid == 0) flags[0] = 0;  // for the next gather (after its first barrier)
                DSP_TR_LAP(4);

                // Warp w < nwa: tokens TPW w .. TPW w + TPW - 1 of the chunk, on the tensor cores (rows nb .. 15 of
                // the 16-row tiles are zero). S = Q K^T by mma m16n8k16, one 8-token n-tile per 8 tokens (K from
                // the swizzled stage by ldmatrix): lane 4g + t holds S of row g at tokens 8x + 2t, 8x + 2t + 1 of
                // n-tile x; the row's max and sum over the warp's tokens across the quad. P (rounded to T) is
                // already the A fragment of P V: by mma m16n8k8 for 8 tokens, by m16n8k16 for 16 (n-tile 1's
                // values as the fragment's columns 8 .. 15), V transposed by ldmatrix.
                if (DSP_ATTN_PROBE != 1 && warp < nwa) {
                    constexpr int NTL = TPW / 8;
                    const int g4 = lane >> 2, t4 = lane & 3, tw0 = warp * TPW;
                    const int tr = tw0 + (lane & 7);  // the stage row this lane addresses for ldmatrix (tile 0)
                    float sacc[NTL][4];
#pragma unroll
                    for (int x = 0; x < NTL; ++x) sacc[x][0] = sacc[x][1] = sacc[x][2] = sacc[x][3] = 0.f;
#pragma unroll
                    for (int kp = 0; kp < D / 32; ++kp) {
                        unsigned kb[NTL][4];
                        const int ch = 4 * kp + (lane >> 3);
#pragma unroll
                        for (int x = 0; x < NTL; ++x) {  // rows tr + 8x share tr's swizzle
                            const unsigned addr = moba::smem_u32(ks + dsp_stage_at<D>(tr + 8 * x, tr, ch, chunk));
                            moba::ldmatrix_x4(addr, kb[x][0], kb[x][1], kb[x][2], kb[x][3]);
                        }
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int k0 = (2 * kp + h) * 16 + 2 * t4;
                            unsigned qa[4] = {0u, 0u, 0u, 0u};
                            if (g4 < nb) {
                                qa[0] = *reinterpret_cast<const unsigned*>(qs + g4 * QSD + k0);
                                qa[2] = *reinterpret_cast<const unsigned*>(qs + g4 * QSD + k0 + 8);
                            }
#pragma unroll
                            for (int x = 0; x < NTL; ++x)
                                moba::Elem<T>::mma(sacc[x], qa, kb[x][2 * h], kb[x][2 * h + 1]);
                        }
                    }
                    const int pos = g4 < nb ? rpos[rb0 + g4] : -1;
                    float pv[NTL][2], mx = dec_neg_inf();
#pragma unroll
                    for (int x = 0; x < NTL; ++x) {
                        const int tk = tok0 + tw0 + 8 * x + 2 * t4;
                        pv[x][0] = tk <= pos ? sacc[x][0] * scale_log2 : dec_neg_inf();
                        pv[x][1] = tk + 1 <= pos ? sacc[x][1] * scale_log2 : dec_neg_inf();
                        mx = fmaxf(mx, fmaxf(pv[x][0], pv[x][1]));
                    }
                    mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, 2));
                    float l = 0.f;
#pragma unroll
                    for (int x = 0; x < NTL; ++x) {  // P (0 for masked tokens)
                        pv[x][0] = mx == dec_neg_inf() ? 0.f : exp2f(pv[x][0] - mx);
                        pv[x][1] = mx == dec_neg_inf() ? 0.f : exp2f(pv[x][1] - mx);
                        l += pv[x][0] + pv[x][1];
                    }
                    l += __shfl_xor_sync(DEC_FULL, l, 1);
                    l += __shfl_xor_sync(DEC_FULL, l, 2);
                    const unsigned pa0 = dec_pack2(pv[0][0], pv[0][1], T());
                    if constexpr (NTL == 1) {
#pragma unroll
                        for (int qd = 0; qd < D / 32; ++qd) {
                            unsigned vb[4];
                            const int ch = 4 * qd + (lane >> 3);
                            const unsigned addr = moba::smem_u32(vs + dsp_stage_at<D>(tr, tr, ch, chunk));
                            moba::ldmatrix_x4_trans(addr, vb[0], vb[1], vb[2], vb[3]);
#pragma unroll
                            for (int i = 0; i < 4; ++i) {
                                float oc[4] = {0.f, 0.f, 0.f, 0.f};
                                moba::Elem<T>::mma_k8(oc, pa0, 0u, vb[i]);
                                if (g4 < nb)
                                    *reinterpret_cast<float2*>(red + (warp * ROWS + g4) * D + (4 * qd + i) * 8 +
                                                               2 * t4) = make_float2(oc[0], oc[1]);
                            }
                        }
                    } else {
                        const unsigned pa[4] = {pa0, 0u, dec_pack2(pv[NTL - 1][0], pv[NTL - 1][1], T()), 0u};
                        // matrix m = lane / 8 of the x4 load: tokens 8 (m & 1) .. + 7 of the warp's 16 (the k
                        // halves of B), 16-byte chunk 2 qd + (m >> 1) (n-tiles 2 qd and 2 qd + 1)
                        const int vr = tw0 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
                        for (int qd = 0; qd < D / 16; ++qd) {
                            unsigned vb[4];
                            const int ch = 2 * qd + (lane >> 4);
                            const unsigned addr = moba::smem_u32(vs + dsp_stage_at<D>(vr, vr, ch, chunk));
                            moba::ldmatrix_x4_trans(addr, vb[0], vb[1], vb[2], vb[3]);
#pragma unroll
                            for (int i = 0; i < 2; ++i) {
                                float oc[4] = {0.f, 0.f, 0.f, 0.f};
                                moba::Elem<T>::mma(oc, pa, vb[2 * i], vb[2 * i + 1]);
                                if (g4 < nb)
                                    *reinterpret_cast<float2*>(red + (warp * ROWS + g4) * D + (2 * qd + i) * 8 +
                                                               2 * t4) = make_float2(oc[0], oc[1]);
                            }
                        }
                    }
                    if (t4 == 0 && g4 < nb) {
                        wml[(warp * ROWS + g4) * 2] = mx;
                        wml[(warp * ROWS + g4) * 2 + 1] = l;
                    }
                }
                __syncthreads();  // every warp's (max, sum, P.V) of the pass
                DSP_TR_LAP(5);

                // The chunk's partial of each row: M = max over warps, o = sum_w o_w 2^(m_w - M), L likewise;
                // 4 consecutive columns a thread.
                for (int y = tid; y < (DSP_ATTN_PROBE == 1 ? 0 : nb * (D / 4)); y += NT) {
                    const int rr = y / (D / 4), d = (y - rr * (D / 4)) * 4;
                    float mw[NW], big = dec_neg_inf();
#pragma unroll
                    for (int w = 0; w < NW; ++w) {
                        mw[w] = w < nwa ? wml[(w * ROWS + rr) * 2] : dec_neg_inf();
                        big = fmaxf(big, mw[w]);
                    }
                    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
                    float lsum = 0.f;
#pragma unroll
                    for (int w = 0; w < NW; ++w) {
                        if (mw[w] == dec_neg_inf()) continue;  // no key of the row (or no token) in warp w
                        const float sc = exp2f(mw[w] - big);
                        const float4 o4 = *reinterpret_cast<const float4*>(red + (w * ROWS + rr) * D + d);
                        sum.x += sc * o4.x;
                        sum.y += sc * o4.y;
                        sum.z += sc * o4.z;
                        sum.w += sc * o4.w;
                        lsum += sc * wml[(w * ROWS + rr) * 2 + 1];
                    }
                    const long long pi = pbase + (long long)rl[rb0 + rr] * nc;
                    if (!accum) {
                        *reinterpret_cast<float4*>(part_o + pi * D + d) = sum;
                        if (d == 0) {
                            part_ml[2 * pi] = big;
                            part_ml[2 * pi + 1] = lsum;
                        }
                        continue;
                    }
                    if (run_first) {
                        run_m = big;
                        run_l = lsum;
                        run_o = sum;
                    } else {  // fold this chunk into the run: both scaled to the larger max
                        const float mn = fmaxf(run_m, big);
                        const float sa = run_m == dec_neg_inf() ? 0.f : exp2f(run_m - mn);
                        const float sb = big == dec_neg_inf() ? 0.f : exp2f(big - mn);
                        run_o = make_float4(run_o.x * sa + sum.x * sb, run_o.y * sa + sum.y * sb,
                                            run_o.z * sa + sum.z * sb, run_o.w * sa + sum.w * sb);
                        run_l = run_l * sa + lsum * sb;
                        run_m = mn;
                        if (d == 0) {
                            part_ml[2 * pi] = dec_neg_inf();
                            part_ml[2 * pi + 1] = 0.f;
                        }
                    }
                    if (run_last) {
                        const long long pf = pi + (run_c - c);  // the run's first chunk slot
                        *reinterpret_cast<float4*>(part_o + pf * D + d) = run_o;
                        if (d == 0) {
                            part_ml[2 * pf] = run_m;
                            part_ml[2 * pf + 1] = run_l;
                        }
                    }
                }
            }
        }
        __syncthreads();  // the batch's items are done with ublk and the stages
        DSP_TR_LAP(6);
#if DSP_ATTN_TMA
        nbase += max(0, hi - lo);
#endif
        r0 += NT;
        if (r0 >= window_total(wcount)) {
            r0 = 0;
            w0 += NT;
        }
    }

    DSP_TR_STAMP(2);
    unsigned* counter = counters + g;
    __syncthreads();
    if (tid == 0) flags[1] = dec_ticket_acq_rel(counter) == (unsigned)(cpg - 1);
    __syncthreads();
    DSP_TR_LAP(0);
    DSP_TR_STAMP(3);
    if (!flags[1]) {
        DSP_TR_FLUSH(0);
        return;
    }
    if (DSP_ATTN_PROBE == 3) {  // the set and counter as the merge would leave them
        for (int x = tid; x < n_words; x += NT) tab[x] = 0;
        if (tid == 0) *counter = 0u;
        if (DSP_OWN_WAIT && SELECT && tid == 0) released[g] = 0u;
        DSP_TR_FLUSH(1);
        return;
    }

    // Last CTA of (b, kv head): one warp per row merges its top_k * n_chunks partials with weights
    // w = 2^(m - M) / L (0 for unused slots and for chunks no key of the row reaches). Each warp's share of the
    // now free P.V sums and stages holds the row's weights, then a batch of partials copied in at once (one
    // round trip to L2 per batch instead of one per few partials).
    const int per_row = top_k * nc;
#if DSP_ATTN_TMA
    float* const mfree = reinterpret_cast<float*>(stages);
    const int share = (NST * 2 * chunk * D * (int)sizeof(T) / (4 * NW)) & ~3;  // floats per warp
#else
    float* const mfree = red;
    const int share = (int)((reinterpret_cast<unsigned char*>(stages) - reinterpret_cast<unsigned char*>(red) +
                             (long long)NST * 2 * chunk * D * (int)sizeof(T)) / (4 * NW)) & ~3;  // floats per warp
#endif
    float* wrow = mfree + warp * share;
    float* stg = wrow + ((per_row + 3) & ~3);
    const int nbat = (share - ((per_row + 3) & ~3)) / D;  // partials per batch (>= 1: the plan checks it)
    for (int r = warp; r < R; r += NW) {
        const long long p0 = ((long long)g * R + r) * per_row;
        float mx = dec_neg_inf();
        float lp[DSP_MERGE_ML];  // the l of this lane's first slots, loaded with their m (one round trip)
        auto ml_at = [&](int sc) {  // (m, l) of slot sc; unused slots (sel -1) weigh nothing and are not read
            float2 ml = make_float2(dec_neg_inf(), 0.f);
            if (sel_at(r * top_k + (sc >> lnc)) >= 0) ml = dec_ldcg(reinterpret_cast<const float2*>(part_ml) + p0 + sc);
            return ml;
        };
#pragma unroll
        for (int x = 0; x < DSP_MERGE_ML; ++x) {
            const int sc = lane + 32 * x;
            const float2 ml = sc < per_row ? ml_at(sc) : make_float2(dec_neg_inf(), 0.f);
            if (sc < per_row) wrow[sc] = ml.x;
            lp[x] = ml.y;
            mx = fmaxf(mx, ml.x);
        }
        for (int sc = lane + 32 * DSP_MERGE_ML; sc < per_row; sc += 32) {
            const float m = ml_at(sc).x;
            wrow[sc] = m;
            mx = fmaxf(mx, m);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DEC_FULL, mx, off));
        float l = 0.f;
        for (int sc = lane, x = 0; sc < per_row; sc += 32, ++x) {
            const float m = wrow[sc];
            const float w = m == dec_neg_inf() ? 0.f : exp2f(m - mx);
            wrow[sc] = w;
            if (w == 0.f) continue;
            float lv = 0.f;
#pragma unroll
            for (int y = 0; y < DSP_MERGE_ML; ++y) lv = x == y ? lp[y] : lv;
            l += w * (x < DSP_MERGE_ML ? lv : dec_ldcg(part_ml + 2 * (p0 + sc) + 1));
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(DEC_FULL, l, off);
        __syncwarp();
        const float inv = 1.f / l;
        float o[CPL];
#pragma unroll
        for (int a = 0; a < CPL; ++a) o[a] = 0.f;
        // A zero weight copies nothing (its partial may be unwritten) and is skipped.
        for (int sc0 = 0; sc0 < per_row; sc0 += nbat) {
            const int nb = min(nbat, per_row - sc0);
            for (int a = 0; a < nb; ++a) {
                if (wrow[sc0 + a] != 0.f && lane < D / 4)  // 16 bytes a lane (D / 4 lanes per partial)
                    dec_cp_async16(stg + a * D + lane * 4, part_o + (p0 + sc0 + a) * D + lane * 4);
            }
            dec_cp_async_commit();
            dec_cp_async_wait<0>();
            __syncwarp();
            for (int a = 0; a < nb; ++a) {
                const float w = wrow[sc0 + a];
                if (w == 0.f) continue;
#pragma unroll
                for (int x = 0; x < CPL; ++x) o[x] += w * stg[a * D + lane * CPL + x];
            }
            __syncwarp();  // the batch is read before the next one lands
        }
        const int i = r / group, gg = r - i * group;
        const long long row = (long long)(b * q_len + i) * heads + kvh * group + gg;
        T* dst = out + row * D + lane * CPL;
        if constexpr (CPL == 4) {
            *reinterpret_cast<uint2*>(dst) = make_uint2(dec_pack2(o[0] * inv, o[1] * inv, T()),
                                                       dec_pack2(o[CPL - 2] * inv, o[CPL - 1] * inv, T()));
        } else {
            *reinterpret_cast<unsigned*>(dst) = dec_pack2(o[0] * inv, o[CPL - 1] * inv, T());
        }
        if (lane == 0) lse[row] = (mx + log2f(l)) * 0.69314718055994531f;
        __syncwarp();
    }
    // Every CTA of the kv head is past its reads of the set: empty it for the next step.
    for (int x = tid; x < n_words; x += NT) tab[x] = 0;
    if (tid == 0) *counter = 0u;
    if (DSP_OWN_WAIT && SELECT && tid == 0) released[g] = 0u;  // every score CTA of the kv head has released
    DSP_TR_LAP(7);
    DSP_TR_STAMP(3);
    DSP_TR_FLUSH(1);
}

// ---- entry points: one macro per kernel with a literal parameter list, one line per dtype x head dim
// (_launch.check_args expands the macros to read the signatures) ----

// The score kernels' `sums` are the fp32 block sums, or in the input build the T block means (dsp_row_t): one
// parameter type for both builds, so the fp32 build's machine code stays that of a float pointer.

#define MOBA_DECODE_SCORE_KERNEL(NAME, T, D)                                                                      \
  extern "C" __global__ void __launch_bounds__(DSP_THREADS, DSP_SCORE_MIN_CTAS) NAME(                             \
      const T* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,                   \
      float* __restrict__ scores, int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size, int n_rg, \
      int rows_per_group, int n_range, int range_blocks, int n_cols) {                                            \
    dsp_score<T, D, false>(q, reinterpret_cast<const dsp_row_t<T>*>(sums), lengths, scores, q_len, heads,       \
                           kv_heads, n_blocks_cap, block_size, n_rg, rows_per_group, n_range, range_blocks,       \
                           n_cols, nullptr, 0, nullptr);                                                          \
  }

// The score kernel that also writes the batch tops (2b: the attention launch selects from them).
#define MOBA_DECODE_SCORE_TOPS_KERNEL(NAME, T, D)                                                                 \
  extern "C" __global__ void __launch_bounds__(DSP_THREADS, DSP_SCORE_MIN_CTAS) NAME(                             \
      const T* __restrict__ q, const float* __restrict__ sums, const int* __restrict__ lengths,                   \
      float* __restrict__ scores, int q_len, int heads, int kv_heads, int n_blocks_cap, int block_size, int n_rg, \
      int rows_per_group, int n_range, int range_blocks, int n_cols, float* __restrict__ tops, int n_bat,         \
      unsigned* __restrict__ released) {                                                                          \
    dec_grid_launch_dependents(); /* a dependent attention launch may place its CTAs as these leave */          \
    dsp_score<T, D, true>(q, reinterpret_cast<const dsp_row_t<T>*>(sums), lengths, scores, q_len, heads,        \
                          kv_heads, n_blocks_cap, block_size, n_rg, rows_per_group, n_range, range_blocks,        \
                          n_cols, tops, n_bat, released);                                                         \
  }

#define MOBA_DECODE_ATTEND_KERNEL(NAME, T, D)                                                                     \
  extern "C" __global__ void __launch_bounds__(DSP_ATTN_THREADS, DSP_ATTN_MIN_CTAS) NAME(                        \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ lengths, \
      const int* __restrict__ sel, int* __restrict__ table, float* __restrict__ part_o,                           \
      float* __restrict__ part_ml, unsigned* __restrict__ counters, T* __restrict__ out, float* __restrict__ lse, \
      int q_len, int heads, int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk,       \
      int n_words, int cpg, int cached, float scale_log2, const __grid_constant__ moba_tensor_map kmap,           \
      const __grid_constant__ moba_tensor_map vmap) {                                                             \
    dsp_attend<T, D, false, false>(q, k, v, lengths, sel, table, part_o, part_ml, counters, out, lse, q_len,      \
                                   heads, kv_heads, capacity, block_size, top_k, n_chunks, chunk, n_words, cpg,   \
                                   cached, scale_log2, nullptr, nullptr, 0, 0, nullptr, 0, nullptr, 0, 0, &kmap,     \
                                   &vmap);                                                                        \
  }

// The attention kernel that selects first (2b): from the score pass's scores and batch tops, writing sel.
#define MOBA_DECODE_ATTEND_SELECT_KERNEL(NAME, T, D)                                                              \
  extern "C" __global__ void __launch_bounds__(DSP_ATTN_THREADS, DSP_ATTN_MIN_CTAS) NAME(                        \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ lengths, \
      int* __restrict__ sel, int* __restrict__ table, float* __restrict__ part_o,                                 \
      float* __restrict__ part_ml, unsigned* __restrict__ counters, T* __restrict__ out, float* __restrict__ lse, \
      int q_len, int heads, int kv_heads, int capacity, int block_size, int top_k, int n_chunks, int chunk,       \
      int n_words, int cpg, float scale_log2, const float* __restrict__ scores, const float* __restrict__ tops,    \
      int n_cols, int n_bat, unsigned* __restrict__ released, int n_score,                                        \
      const __grid_constant__ moba_tensor_map kmap, const __grid_constant__ moba_tensor_map vmap) {               \
    dsp_attend<T, D, false, true>(q, k, v, lengths, sel, table, part_o, part_ml, counters, out, lse, q_len, heads, \
                                  kv_heads, capacity, block_size, top_k, n_chunks, chunk, n_words, cpg, 1,        \
                                  scale_log2, scores, tops, n_cols, n_bat, released, n_score, nullptr, 0, 0,      \
                                  &kmap, &vmap);                                                                  \
  }

// The same kernels over a paged cache: k, v (n_pages, kv_heads, page_size, D), block j of sequence b in page
// page_table[b * pages_per_seq + j * B / page_size] (page_size a multiple of B).
#define MOBA_DECODE_ATTEND_PAGED_KERNEL(NAME, T, D)                                                               \
  extern "C" __global__ void __launch_bounds__(DSP_ATTN_THREADS, DSP_ATTN_MIN_CTAS) NAME(                        \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ lengths, \
      const int* __restrict__ sel, int* __restrict__ table, float* __restrict__ part_o,                           \
      float* __restrict__ part_ml, unsigned* __restrict__ counters, T* __restrict__ out, float* __restrict__ lse, \
      int q_len, int heads, int kv_heads, int block_size, int top_k, int n_chunks, int chunk, int n_words,        \
      int cpg, int cached, float scale_log2, const int* __restrict__ page_table, int page_size,                   \
      int pages_per_seq, const __grid_constant__ moba_tensor_map kmap,                                            \
      const __grid_constant__ moba_tensor_map vmap) {                                                             \
    dsp_attend<T, D, true, false>(q, k, v, lengths, sel, table, part_o, part_ml, counters, out, lse, q_len, heads, \
                                  kv_heads, 0, block_size, top_k, n_chunks, chunk, n_words, cpg, cached,          \
                                  scale_log2, nullptr, nullptr, 0, 0, nullptr, 0, page_table, page_size,          \
                                  pages_per_seq, &kmap, &vmap);                                                   \
  }

#define MOBA_DECODE_ATTEND_PAGED_SELECT_KERNEL(NAME, T, D)                                                        \
  extern "C" __global__ void __launch_bounds__(DSP_ATTN_THREADS, DSP_ATTN_MIN_CTAS) NAME(                        \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ lengths, \
      int* __restrict__ sel, int* __restrict__ table, float* __restrict__ part_o,                                 \
      float* __restrict__ part_ml, unsigned* __restrict__ counters, T* __restrict__ out, float* __restrict__ lse, \
      int q_len, int heads, int kv_heads, int block_size, int top_k, int n_chunks, int chunk, int n_words,        \
      int cpg, float scale_log2, const float* __restrict__ scores, const float* __restrict__ tops, int n_cols,     \
      int n_bat, unsigned* __restrict__ released, int n_score, const int* __restrict__ page_table, int page_size, \
      int pages_per_seq, const __grid_constant__ moba_tensor_map kmap,                                            \
      const __grid_constant__ moba_tensor_map vmap) {                                                             \
    dsp_attend<T, D, true, true>(q, k, v, lengths, sel, table, part_o, part_ml, counters, out, lse, q_len, heads,  \
                                 kv_heads, 0, block_size, top_k, n_chunks, chunk, n_words, cpg, 1, scale_log2,    \
                                 scores, tops, n_cols, n_bat, released, n_score, page_table, page_size,           \
                                 pages_per_seq, &kmap, &vmap);                                                    \
  }

extern "C" __global__ void __launch_bounds__(DSP_THREADS, DSP_SELECT_MIN_CTAS) moba_decode_route_select(
    const float* __restrict__ scores, const int* __restrict__ lengths, int* __restrict__ sel, int* __restrict__ table,
    int q_len, int heads, int kv_heads, int block_size, int top_k, int n_cols, int n_words, int wpr) {
    dsp_select(scores, lengths, sel, table, q_len, heads, kv_heads, block_size, top_k, n_cols, n_words, wpr);
}

MOBA_DECODE_SCORE_KERNEL(moba_decode_route_score_bf16_d64,                         __nv_bfloat16,   64)
MOBA_DECODE_SCORE_KERNEL(moba_decode_route_score_bf16_d128,                        __nv_bfloat16,  128)
MOBA_DECODE_SCORE_KERNEL(moba_decode_route_score_fp16_d64,                         __half,          64)
MOBA_DECODE_SCORE_KERNEL(moba_decode_route_score_fp16_d128,                        __half,         128)
MOBA_DECODE_SCORE_TOPS_KERNEL(moba_decode_route_score_tops_bf16_d64,               __nv_bfloat16,   64)
MOBA_DECODE_SCORE_TOPS_KERNEL(moba_decode_route_score_tops_bf16_d128,              __nv_bfloat16,  128)
MOBA_DECODE_SCORE_TOPS_KERNEL(moba_decode_route_score_tops_fp16_d64,               __half,          64)
MOBA_DECODE_SCORE_TOPS_KERNEL(moba_decode_route_score_tops_fp16_d128,              __half,         128)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_bf16_d64,                             __nv_bfloat16,   64)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_bf16_d128,                            __nv_bfloat16,  128)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_fp16_d64,                             __half,          64)
MOBA_DECODE_ATTEND_KERNEL(moba_decode_attend_fp16_d128,                            __half,         128)
MOBA_DECODE_ATTEND_SELECT_KERNEL(moba_decode_attend_select_bf16_d64,               __nv_bfloat16,   64)
MOBA_DECODE_ATTEND_SELECT_KERNEL(moba_decode_attend_select_bf16_d128,              __nv_bfloat16,  128)
MOBA_DECODE_ATTEND_SELECT_KERNEL(moba_decode_attend_select_fp16_d64,               __half,          64)
MOBA_DECODE_ATTEND_SELECT_KERNEL(moba_decode_attend_select_fp16_d128,              __half,         128)
MOBA_DECODE_ATTEND_PAGED_KERNEL(moba_decode_attend_paged_bf16_d64,                 __nv_bfloat16,   64)
MOBA_DECODE_ATTEND_PAGED_KERNEL(moba_decode_attend_paged_bf16_d128,                __nv_bfloat16,  128)
MOBA_DECODE_ATTEND_PAGED_KERNEL(moba_decode_attend_paged_fp16_d64,                 __half,          64)
MOBA_DECODE_ATTEND_PAGED_KERNEL(moba_decode_attend_paged_fp16_d128,                __half,         128)
MOBA_DECODE_ATTEND_PAGED_SELECT_KERNEL(moba_decode_attend_paged_select_bf16_d64,   __nv_bfloat16,   64)
MOBA_DECODE_ATTEND_PAGED_SELECT_KERNEL(moba_decode_attend_paged_select_bf16_d128,  __nv_bfloat16,  128)
MOBA_DECODE_ATTEND_PAGED_SELECT_KERNEL(moba_decode_attend_paged_select_fp16_d64,   __half,          64)
MOBA_DECODE_ATTEND_PAGED_SELECT_KERNEL(moba_decode_attend_paged_select_fp16_d128,  __half,         128)
