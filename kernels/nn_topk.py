"""Triton kernel for ``nn_topk``: each query's k most similar queue entries without the [B, Q] similarities.

Kernel-level form (vitfast/ops/nn_topk.py is the contract): queries [B, d], queue [Q, d] (one dtype), query_ids [B],
queue_ids [Q] int64, k -> (values [B, k] fp32, indices [B, k] int64): the k best entries with queue_ids[q] !=
query_ids[b], similarity descending, ties by the lower queue index first.

Rank keys. A similarity s (fp32) and its queue index q become one int64 whose signed order is the rank order:

    key = ordered(s) << 32 | (2^32 - 1 - q),   ordered(s) = the fp32 bits, the magnitude bits flipped when negative

so "greater key" means "higher similarity, or equal similarity and lower index" (-0.0 counts as +0.0; NaN, which
torch's descending sort puts first, gets the greatest). Keys are unique, so any top-k of keys is exact and does not
depend on the order in which candidates meet: ties across tiles and chunks resolve as the contract says.
Excluded entries, rows past Q and the padding of a short chunk get the key INT64_MIN (never picked: every query
has >= k eligible entries, which the public function checks).

Kernel (1-D grid, query block fastest on axis 0 so that programs running together share a queue chunk in L2):

    _nn_topk_kernel   program per (query block of BLOCK_B rows, queue chunk of TILES_PER_CHUNK x BLOCK_Q rows);
                      per queue tile: similarities by tl.dot (fp32 accumulation), keys, and a threshold test
                      against each row's current K-th best key; only a tile holding a better key for some row pays
                      the merge (tl.topk of the tile to KP, joined with the running [BLOCK_B, KP] keys, tl.topk
                      again). Writes the K best keys of its chunk: [B, n_chunks, K] int64.

Host side: n_chunks * K <= Q / 64 (candidates at most 1/32 of the [B, Q] fp32 similarities' bytes), merged with one
torch.topk over [B, n_chunks * K] keys and decoded into (values, indices). KP (the kept width, a power of two) is
32 for k <= 32 and 128 up to 128; a larger k runs in rounds of 128, each round keeping only keys below the last
one found (a per-query ceiling key), so memory stays O(B * k) for any k.
D: fp16 / bf16 rows up to 256 are one zero-padded BLOCK_D chunk held in registers for the whole loop; fp32 and
wider rows sum the dot over BLOCK_D chunks. Dots take the input dtype: fp16 / bf16 on tensor cores, fp32 as TF32
unless ``torch.get_float32_matmul_precision() == "highest"`` (IEEE), like the reference's matmul.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, aot_specs, input_precision, launch_device
from .contrastive_loss import _chunked_scores, _load_rows  # the same row tiles and chunked dots

_INT64_MIN = -(2 ** 63)
_INT64_MAX = 2 ** 63 - 1
_INT64_MIN_C = tl.constexpr(_INT64_MIN)
_INT64_MAX_C = tl.constexpr(_INT64_MAX)
_LOW_MASK = 0xFFFFFFFF
_LOW_MASK_C = tl.constexpr(_LOW_MASK)

# ---------------------------------------------------------------------------------------------------
# Launch parameters: [K class][D class][dtype], read by the launcher and by AOT_SPECS (python -m
# vitfast.compile_check compiles every entry for sm_80 and sm_90a: 0 spills, mma / wgmma).
# K classes: KP = 32 (k <= 32: MAE-CT's k = 20, NNCLR's k = 1) and KP = 128 (33..128, and the rounds of a larger k);
# BLOCK_Q >= KP (tl.topk of a tile to KP). D classes as in contrastive_loss: the widest row of the class; fp16 /
# bf16 rows up to 256 are one chunk (ONE_CHUNK), wider rows and fp32 (twice the registers per element) are summed
# over BLOCK_D chunks. The running keys and a tile's keys are int64 in registers (with the bitonic merge's
# temporaries): 64 query rows spilled at 255 registers on sm_80 for KP = 128 (40-264 B) and for chunked 16-bit
# (48 B), and 32 fp32 rows on sm_90a (IEEE, 104 B); hence 16 rows for KP = 128 and fp32, 32 for chunked 16-bit,
# and 32-wide D chunks for chunked 16-bit at KP = 128 (64 still spilled 48 B on sm_80).
# ---------------------------------------------------------------------------------------------------
K_CLASSES = {"k32": 32, "k128": 128}
D_CLASSES = {"d128": 128, "d256": 256, "chunked": None}


def _per_dtype(half: dict, fp32: dict) -> dict:
    return {torch.float16: half, torch.bfloat16: half, torch.float32: fp32}


def _table() -> dict:
    table = {}
    for kclass, kp in K_CLASSES.items():
        block_b, block_q = (64, 64) if kp == 32 else (16, 128)
        fp32 = dict(BLOCK_B=16, BLOCK_Q=block_q, BLOCK_D=32, KP=kp, ONE_CHUNK=False, num_warps=8, num_stages=1)
        table[kclass] = {
            "d128": _per_dtype(dict(BLOCK_B=block_b, BLOCK_Q=block_q, BLOCK_D=128, KP=kp, ONE_CHUNK=True,
                                    num_warps=4 if kp == 32 else 8, num_stages=2), fp32),
            "d256": _per_dtype(dict(BLOCK_B=block_b, BLOCK_Q=block_q, BLOCK_D=256, KP=kp, ONE_CHUNK=True,
                                    num_warps=8, num_stages=2 if kp == 32 else 1), fp32),
            "chunked": _per_dtype(dict(BLOCK_B=min(block_b, 32), BLOCK_Q=block_q, BLOCK_D=64 if kp == 32 else 32,
                                       KP=kp, ONE_CHUNK=False,
                                       num_warps=8, num_stages=1), fp32),
        }
    return table


CONFIG = _table()
# Programs to aim for: two waves of a 132-SM GPU (a constant, so the split never depends on the GPU; the result
# would not either: keys are exact).
TARGET_PROGRAMS = 264
MIN_TILES_PER_CHUNK = 8  # the first tiles of a chunk always merge; later ones mostly pass the threshold test
CANDIDATE_ROWS_PER_KEY = 64  # n_chunks * K <= Q / 64: int64 candidates <= 1/32 of the [B, Q] fp32 bytes


def d_class(D: int) -> str:
    return next((name for name, widest in D_CLASSES.items() if widest is not None and D <= widest), "chunked")


def k_class(K: int) -> str:
    return next(name for name, kp in K_CLASSES.items() if K <= kp)


# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _rank_keys(s, offs_q):
    """int64 keys of similarities s [BB, BQ] (fp32) at queue rows offs_q [BQ]: greater key = better rank."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # arithmetic shift: flips the magnitude of negatives only
    ordered = tl.where(s == 0.0, 0, ordered)  # -0.0 ties with +0.0 (index order), as in torch's sort
    ordered = tl.where(s != s, 0x7FFFFFFF, ordered)  # NaN first, as torch's descending sort puts it
    low = _LOW_MASK_C - offs_q.to(tl.int64)  # lower index, greater key
    return (ordered.to(tl.int64) << 32) | low[None, :]


@triton.jit
def _kth_key(run, K, KP: tl.constexpr):
    """Each row's K-th greatest key of run [BB, KP] (sorted descending): the key a candidate must beat."""
    return tl.min(tl.where((tl.arange(0, KP) < K)[None, :], run, _INT64_MAX_C), axis=1)


@triton.jit
def _nn_topk_kernel(
    queries_ptr, queue_ptr, query_ids_ptr, queue_ids_ptr, ceiling_ptr, keys_ptr,
    B, Q, D, K, TILES_PER_CHUNK,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    KP: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    # keys_ptr: [B, n_chunks, K] int64, this chunk's K best keys per query in rank order (INT64_MIN where the chunk
    # has fewer than K eligible entries). ceiling_ptr: [B] int64, only keys below it count (the rounds of a k > KP).
    n_blocks = tl.cdiv(B, BLOCK_B)
    pid = tl.program_id(0)
    chunk = pid // n_blocks
    offs_b = (pid % n_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = offs_b < B
    query_id = tl.load(query_ids_ptr + offs_b, mask=in_b, other=0)
    ceiling = tl.load(ceiling_ptr + offs_b, mask=in_b, other=_INT64_MIN_C)
    if ONE_CHUNK:
        queries = _load_rows(queries_ptr, offs_b, B, tl.arange(0, BLOCK_D), D)  # held for the whole loop
    run = tl.full((BLOCK_B, KP), _INT64_MIN_C, dtype=tl.int64)
    threshold = tl.full((BLOCK_B,), _INT64_MIN_C, dtype=tl.int64)
    q_start = chunk * TILES_PER_CHUNK * BLOCK_Q
    q_stop = tl.minimum(q_start + TILES_PER_CHUNK * BLOCK_Q, Q)
    for q0 in range(q_start, q_stop, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        in_q = offs_q < q_stop
        if ONE_CHUNK:
            queue = _load_rows(queue_ptr, offs_q, Q, tl.arange(0, BLOCK_D), D)
            s = tl.dot(queries, tl.trans(queue), input_precision=INPUT_PRECISION)
        else:
            s = _chunked_scores(queries_ptr, queue_ptr, offs_b, offs_q, B, Q, D, INPUT_PRECISION, BLOCK_B, BLOCK_Q,
                                BLOCK_D)
        queue_id = tl.load(queue_ids_ptr + offs_q, mask=in_q, other=0)
        keys = _rank_keys(s, offs_q)
        eligible = in_q[None, :] & (queue_id[None, :] != query_id[:, None]) & (keys < ceiling[:, None])
        keys = tl.where(eligible, keys, _INT64_MIN_C)
        # the merge (two bitonic top-k) only where some row of the block has a key better than its K-th best
        if tl.max((keys > threshold[:, None]).to(tl.int32)) > 0:
            both = tl.reshape(tl.join(run, tl.topk(keys, KP)), (BLOCK_B, 2 * KP))
            run = tl.topk(both, KP)
            threshold = _kth_key(run, K, KP)
    n_chunks = tl.num_programs(0) // n_blocks
    cols = tl.arange(0, KP)
    out = keys_ptr + (offs_b.to(tl.int64)[:, None] * n_chunks + chunk) * K + cols[None, :]
    tl.store(out, run, mask=in_b[:, None] & (cols < K)[None, :])


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------
def plan(B: int, Q: int, D: int, K: int, dtype: torch.dtype) -> tuple:
    """(launch-table entry, n_chunks, tiles per chunk) of one round keeping K <= 128 keys per query."""
    cfg = CONFIG[k_class(K)][d_class(D)][dtype]
    tiles = triton.cdiv(Q, cfg["BLOCK_Q"])
    n_blocks = triton.cdiv(B, cfg["BLOCK_B"])
    wanted = min(triton.cdiv(TARGET_PROGRAMS, n_blocks), Q // (CANDIDATE_ROWS_PER_KEY * K),
                 tiles // MIN_TILES_PER_CHUNK)
    tiles_per_chunk = triton.cdiv(tiles, max(1, wanted))
    return cfg, triton.cdiv(tiles, tiles_per_chunk), tiles_per_chunk


def decode_keys(keys: torch.Tensor) -> tuple:
    """Rank keys int64 [...] -> (similarities fp32, queue indices int64)."""
    ordered = (keys >> 32).to(torch.int32)
    values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return values, _LOW_MASK - (keys & _LOW_MASK)


def _round_keys(queries, queue, query_ids, queue_ids, ceiling, K: int) -> torch.Tensor:
    """[B, K] int64: each query's K best keys below its ceiling, in rank order."""
    (B, D), Q = queries.shape, queue.shape[0]
    cfg, n_chunks, tiles_per_chunk = plan(B, Q, D, K, queries.dtype)
    keys = torch.empty((B, n_chunks, K), device=queries.device, dtype=torch.int64)  # fully written
    _nn_topk_kernel[(triton.cdiv(B, cfg["BLOCK_B"]) * n_chunks,)](
        queries, queue, query_ids, queue_ids, ceiling, keys, B, Q, D, K, tiles_per_chunk,
        INPUT_PRECISION=input_precision(queries.dtype), **cfg)
    if n_chunks == 1:
        return keys.view(B, K)
    return torch.topk(keys.view(B, n_chunks * K), K, dim=1).values  # keys are unique: exact, deterministic


def nn_topk(queries, queue, query_ids, queue_ids, k: int) -> tuple:
    """(values [B, k] fp32, indices [B, k] int64) for queries [B, d], queue [Q, d] (contiguous, one dtype),
    query_ids [B], queue_ids [Q] int64; every query has >= k eligible entries."""
    if queries.dtype not in TRITON_DTYPE:
        raise TypeError(f"nn_topk (triton) takes float32/float16/bfloat16, got {queries.dtype}")
    B, Q = queries.shape[0], queue.shape[0]
    if Q >= 2 ** 31:
        raise ValueError(f"nn_topk (triton) takes a queue of fewer than 2^31 entries, got {Q}")
    if B == 0:
        return queries.new_empty((0, k), dtype=torch.float32), queries.new_empty((0, k), dtype=torch.int64)
    rounds = []
    with launch_device(queries):
        ceiling = torch.full((B,), _INT64_MAX, device=queries.device, dtype=torch.int64)
        for done in range(0, k, max(K_CLASSES.values())):
            keys = _round_keys(queries, queue, query_ids, queue_ids, ceiling, min(k - done, max(K_CLASSES.values())))
            rounds.append(keys)
            ceiling = keys[:, -1].contiguous()
        return decode_keys(rounds[0] if len(rounds) == 1 else torch.cat(rounds, dim=1))


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (walked by vitfast.compile_check): every K class x D class x dtype x precision.
# ---------------------------------------------------------------------------------------------------
def _aot_specs() -> list:
    specs, seen = [], set()
    for kclass in K_CLASSES:
        for dclass in D_CLASSES:
            for spec in aot_specs(
                    _nn_topk_kernel, CONFIG[kclass][dclass].get,
                    lambda ty: dict(queries_ptr=ty, queue_ptr=ty, query_ids_ptr="i64", queue_ids_ptr="i64",
                                    ceiling_ptr="i64", keys_ptr="i64"),
                    {}, ints=("B", "Q", "D", "K", "TILES_PER_CHUNK"), variant=f"{kclass} {dclass}"):
                # fp32 shares one entry across D classes: compile each distinct build once
                key = (tuple(sorted(spec.constexprs.items())), spec.signature["queries_ptr"], spec.num_warps,
                       spec.num_stages)
                if key not in seen:
                    seen.add(key)
                    if not spec.constexprs["ONE_CHUNK"] and spec.signature["queries_ptr"] == "*fp32":
                        spec = dataclasses.replace(spec, variant=spec.variant.replace(dclass, "any d"))
                    specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()
