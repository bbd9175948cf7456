"""FlashAttention-2 backward in Triton: the three kernels behind flash_attention's autograd.

Backward (Dao 2023, Alg. 2). P is recomputed from the saved lse, P = exp2(S - lse), then
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  delta = rowsum(dO * O),
    dQ = scale * dS K,  dK = scale * dS^T Q.
Three kernels: a preprocess computing delta; a dK/dV kernel (one program per key block,
looping over query blocks, and over the query heads of a GQA group so dK/dV are summed
over the group in registers: no atomics); a dQ kernel (one program per query block,
looping over key blocks).

Shared with the forward (kernels/flash_attention.py): bottom-right causal masks, GQA by head
index, D padded to BLOCK_D and masked, and the split of each loop into unmasked blocks and the
few that straddle the diagonal or the ragged end. Plain pointers, so it runs in the interpreter.
"""
import triton
import triton.language as tl


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, sob, soh, sot, sod, sdb, sdh, sdt, sdd, Hq, Tq, D,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i = sum_d dO_id * O_id  (= rowsum(P * dP), used in dS = P * (dP - delta))
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // Hq, pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot
                + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                 + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)

@triton.jit
def _dkdv_step(Qh, DOh, LSEh, DELTAh, k, v, dk, dv, start_m, offs_m, offs_n, offs_d, d_ok,
               sqt, sqd, sdt, sdd, Tq, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    # one query block's contribution to this key block's dK, dV. Keys past Tk need no
    # mask here: their k, v rows are 0 and their dK, dV rows are never stored.
    rows = start_m + offs_m
    q_mask = d_ok
    if MASKED:
        q_mask = q_mask & (rows[:, None] < Tq)
    q = tl.load(Qh + rows[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DOh + rows[:, None] * sdt + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
    if MASKED:  # rows past Tq: lse = +inf makes their P exactly 0
        lse = tl.load(LSEh + rows, mask=rows < Tq, other=float("inf"))
        delta = tl.load(DELTAh + rows, mask=rows < Tq, other=0.0)
    else:
        lse = tl.load(LSEh + rows)
        delta = tl.load(DELTAh + rows)
    # transposed tiles (keys x queries): P^T = exp2(S^T - lse)
    pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    if MASKED and CAUSAL:
        pT = tl.where(offs_n[:, None] <= rows[None, :] + diag, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)                    # dV += P^T dO
    dpT = tl.dot(v, tl.trans(do))                        # dP^T = V dO^T
    dsT = pT * (dpT - delta[None, :])                    # dS = P * (dP - delta)
    dk += tl.dot(dsT.to(q.dtype), q)                     # dK += dS^T Q
    return dk, dv

@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                   svb, svh, svt, svd, sdb, sdh, sdt, sdd, Hq, Hkv, GROUP, Tq, Tk, D,
                   scale, qk_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)  # one key block of one kv head
    b, kvh = pid_bh // Hkv, pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    kv_mask = (offs_n[:, None] < Tk) & d_ok
    k = tl.load(K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + offs_n[:, None] * skt
                + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh + offs_n[:, None] * svt
                + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = Tk - Tq
    # query blocks: [lo, mid) straddle the diagonal (masked); [mid, full) see every key of
    # this block (no masks); [full, Tq) is the ragged tail (masked). Rows before lo see none.
    lo = 0
    mid = 0
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - diag) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(0, pid_n * BLOCK_N + BLOCK_N - 1 - diag) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full = Tq // BLOCK_M * BLOCK_M
    for g in range(GROUP):  # all query heads sharing this kv head: sum their dK, dV
        h = kvh * GROUP + g
        Qh = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        DOh = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        row0 = (b * Hq + h).to(tl.int64) * Tq
        for start_m in range(lo, tl.minimum(mid, Tq), BLOCK_M):
            dk, dv = _dkdv_step(Qh, DOh, LSE + row0, DELTA + row0, k, v, dk, dv, start_m, offs_m,
                                offs_n, offs_d, d_ok, sqt, sqd, sdt, sdd, Tq, diag, qk_scale,
                                True, CAUSAL)
        for start_m in range(mid, full, BLOCK_M):
            dk, dv = _dkdv_step(Qh, DOh, LSE + row0, DELTA + row0, k, v, dk, dv, start_m, offs_m,
                                offs_n, offs_d, d_ok, sqt, sqd, sdt, sdd, Tq, diag, qk_scale,
                                False, CAUSAL)
        for start_m in range(tl.maximum(mid, full), Tq, BLOCK_M):
            dk, dv = _dkdv_step(Qh, DOh, LSE + row0, DELTA + row0, k, v, dk, dv, start_m, offs_m,
                                offs_n, offs_d, d_ok, sqt, sqd, sdt, sdd, Tq, diag, qk_scale,
                                True, CAUSAL)
    dk = dk * scale
    base = (b * Hkv + kvh).to(tl.int64) * Tk * D  # DK, DV are freshly allocated, contiguous
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

@triton.jit
def _dq_step(q, do, lse, delta, K, V, dq, start_n, offs_m, offs_n, offs_d, d_ok, skt, skd,
             svt, svd, Tk, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    # one key block's contribution to this query block's dQ
    cols = start_n + offs_n
    kv_mask = d_ok
    if MASKED:
        kv_mask = kv_mask & (cols[:, None] < Tk)
    k = tl.load(K + cols[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + cols[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # recomputed P
    if MASKED:
        keep = cols[None, :] < Tk
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v))                 # dP = dO V^T
    ds = p * (dp - delta[:, None])               # dS = P * (dP - delta)
    dq += tl.dot(ds.to(k.dtype), k)              # dQ += dS K
    return dq

@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                 svb, svh, svt, svd, sdb, sdh, sdt, sdd, Hq, GROUP, Tq, Tk, D,
                 scale, qk_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)  # one query block of one q head
    b, h = pid_bh // Hq, pid_bh % Hq
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q_mask = (offs_m[:, None] < Tq) & d_ok
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqt
                + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sdt
                 + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
    # rows past Tq, and rows that see no key, have lse = +inf: their P is exactly 0
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    K += b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    V += b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = Tk - Tq
    full = Tk // BLOCK_N * BLOCK_N  # as in the forward: [0, full) unmasked, [full, hi) masked
    hi = Tk
    if CAUSAL:
        full = tl.minimum(full, tl.maximum(0, pid_m * BLOCK_M + diag + 1) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + diag)
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_step(q, do, lse, delta, K, V, dq, start_n, offs_m, offs_n, offs_d, d_ok,
                      skt, skd, svt, svd, Tk, diag, qk_scale, False, CAUSAL)
    for start_n in range(full, hi, BLOCK_N):
        dq = _dq_step(q, do, lse, delta, K, V, dq, start_n, offs_m, offs_n, offs_d, d_ok,
                      skt, skd, svt, svd, Tk, diag, qk_scale, True, CAUSAL)
    dq = dq * scale
    tl.store(DQ + pid_bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)
