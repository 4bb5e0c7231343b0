"""The Triton tiles of `triton_kernel.py` (a module of its own: Triton resolves the helpers a kernel
calls among its module's globals, and only this module imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def load_scalars(TH, AF, h, sth, sah):
    """Head h's MultiMax scalars (theta row `h * sth`, 0 when shared) and affine as (1 + a, c)."""
    row, arow = TH + h * sth, AF + h * sah
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
            tl.load(row + 6), tl.load(row + 7), 1.0 + tl.load(arow), tl.load(arow + 1))


@triton.jit
def modulate(s, t1, t2, t3, t4, b1, d1, b2, d2, aa, ac):
    x = aa * s + ac
    lo1 = tl.maximum(b1 - x, 0.0)
    hi1 = tl.maximum(x - d1, 0.0)
    lo2 = tl.maximum(b2 - x, 0.0)
    hi2 = tl.maximum(x - d2, 0.0)
    return x, lo1, hi1, lo2, hi2, x + t1 * lo1 + t2 * hi1 + t3 * lo2 * lo2 + t4 * hi2 * hi2


@triton.jit
def scores(q, k, scale, bias_ptrs, softcap, rows, cols, q_len, k_len, offset, post_ptrs,
           CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POST: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Pre-modulator scores s, tanh of the softcap (for its gradient), and the keep mask."""
    u = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    th = u * 0.0
    if HAS_SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * u / softcap) - 1.0  # tanh(u / softcap)
        u = softcap * th
    keep = (rows[:, None] < q_len) & (cols[None, :] < k_len)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + offset)
    if HAS_BIAS:
        u += tl.load(bias_ptrs, mask=keep, other=0.0)
    post = u * 0.0
    if HAS_POST:
        post = tl.load(post_ptrs, mask=keep, other=0.0)
        keep = keep & (post == 0.0)
    return u, th, keep


@triton.jit
def forward_kernel(Q, K, V, TH, AF, BIAS, POST, OUT, LSE,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                   sbb, sbh, sbm, spb, sph, spm, sth, sah,
                   H, HKV, q_len, k_len, head_dim, scale, softcap, offset,
                   CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POST: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // (H // HKV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
                mask=(rows[:, None] < q_len) & dmask[None, :], other=0.0).to(tl.float32)
    t1, t2, t3, t4, b1, d1, b2, d2, aa, ac = load_scalars(TH, AF, h, sth, sah)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = k_len
    if CAUSAL:
        end = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < k_len) & dmask[None, :]
        k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s, th, keep = scores(q, k, scale, BIAS + b * sbb + h * sbh + rows[:, None] * sbm + cols[None, :], softcap,
                             rows, cols, q_len, k_len, offset,
                             POST + b * spb + h * sph + rows[:, None] * spm + cols[None, :],
                             CAUSAL, HAS_BIAS, HAS_POST, HAS_SOFTCAP)
        x, lo1, hi1, lo2, hi2, y = modulate(s, t1, t2, t3, t4, b1, d1, b2, d2, aa, ac)
        y = tl.where(keep, y, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(y, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(y - m_safe[:, None])
        corr = tl.exp(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(OUT + b * sob + h * soh + rows[:, None] * som + dims[None, :], out,
             mask=(rows[:, None] < q_len) & dmask[None, :])
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh * q_len + rows, lse, mask=rows < q_len)


@triton.jit
def tile_grads(q, k, v, do, lse, delta, scale, softcap, rows, cols, q_len, k_len, offset, bias_ptrs, post_ptrs,
               t1, t2, t3, t4, b1, d1, b2, d2, aa, ac,
               CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POST: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               SCALARS: tl.constexpr):
    """Recomputed probabilities, dS (w.r.t. q.k) and, with SCALARS (the dK/dV kernel sums them; the dQ
    kernel does not need them), the ten scalar-gradient terms of one tile."""
    s, th, keep = scores(q, k, scale, bias_ptrs, softcap, rows, cols, q_len, k_len, offset, post_ptrs,
                         CAUSAL, HAS_BIAS, HAS_POST, HAS_SOFTCAP)
    x, lo1, hi1, lo2, hi2, y = modulate(s, t1, t2, t3, t4, b1, d1, b2, d2, aa, ac)
    p = tl.where(keep, tl.exp(tl.minimum(y - lse[:, None], 0.0)), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    dy = p * (dp - delta[:, None])
    below1 = tl.where(x < b1, 1.0, 0.0)
    above1 = tl.where(x > d1, 1.0, 0.0)
    dx = dy * (1.0 - t1 * below1 + t2 * above1 - 2.0 * t3 * lo2 + 2.0 * t4 * hi2)
    # The ten scalar gradients of this tile as one [16] vector (slots 10..15 unused).
    idx = tl.arange(0, 16)
    g = tl.zeros([16], tl.float32)
    if SCALARS:
        g += tl.where(idx == 0, tl.sum(tl.sum(dy * lo1, 1), 0), 0.0)
        g += tl.where(idx == 1, tl.sum(tl.sum(dy * hi1, 1), 0), 0.0)
        g += tl.where(idx == 2, tl.sum(tl.sum(dy * lo2 * lo2, 1), 0), 0.0)
        g += tl.where(idx == 3, tl.sum(tl.sum(dy * hi2 * hi2, 1), 0), 0.0)
        g += tl.where(idx == 4, t1 * tl.sum(tl.sum(dy * below1, 1), 0), 0.0)
        g += tl.where(idx == 5, -t2 * tl.sum(tl.sum(dy * above1, 1), 0), 0.0)
        g += tl.where(idx == 6, 2.0 * t3 * tl.sum(tl.sum(dy * lo2, 1), 0), 0.0)
        g += tl.where(idx == 7, -2.0 * t4 * tl.sum(tl.sum(dy * hi2, 1), 0), 0.0)
        g += tl.where(idx == 8, tl.sum(tl.sum(dx * s, 1), 0), 0.0)
        g += tl.where(idx == 9, tl.sum(tl.sum(dx, 1), 0), 0.0)
    dx = dx * aa
    if HAS_SOFTCAP:
        dx = dx * (1.0 - th * th)
    return p, dx * scale, g


@triton.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, TH, AF, BIAS, POST, DK, DV, DS,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
                sbb, sbh, sbm, spb, sph, spm, sth, sah, skgb, skgh, skgn,
                H, HKV, q_len, k_len, head_dim, scale, softcap, offset,
                CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POST: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // (H // HKV)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    kv_mask = (cols[:, None] < k_len) & dmask[None, :]
    k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    t1, t2, t3, t4, b1, d1, b2, d2, aa, ac = load_scalars(TH, AF, h, sth, sah)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    gs = tl.zeros([16], tl.float64)  # tile sums added in float64: the error stays a tile's, whatever q_len
    start_m = 0
    if CAUSAL:
        start_m = tl.maximum(0, pid_n * BLOCK_N - offset) // BLOCK_M * BLOCK_M
    for start in range(start_m, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        qmask = (rows[:, None] < q_len) & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], mask=qmask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + dims[None, :], mask=qmask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * q_len + rows, mask=rows < q_len, other=float("inf"))
        delta = tl.load(DELTA + bh * q_len + rows, mask=rows < q_len, other=0.0)
        p, ds, g = tile_grads(q, k, v, do, lse, delta, scale, softcap, rows, cols, q_len, k_len, offset,
                              BIAS + b * sbb + h * sbh + rows[:, None] * sbm + cols[None, :],
                              POST + b * spb + h * sph + rows[:, None] * spm + cols[None, :],
                              t1, t2, t3, t4, b1, d1, b2, d2, aa, ac, CAUSAL, HAS_BIAS, HAS_POST, HAS_SOFTCAP, True)
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        gs += g.to(tl.float64)
    tl.store(DK + b * skgb + h * skgh + cols[:, None] * skgn + dims[None, :], dk, mask=kv_mask)
    tl.store(DV + b * skgb + h * skgh + cols[:, None] * skgn + dims[None, :], dv, mask=kv_mask)
    tl.store(DS + (bh * tl.num_programs(0) + pid_n) * 16 + tl.arange(0, 16), gs)


@triton.jit
def dq_kernel(Q, K, V, DO, LSE, DELTA, TH, AF, BIAS, POST, DQ,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm,
              sbb, sbh, sbm, spb, sph, spm, sth, sah,
              H, HKV, q_len, k_len, head_dim, scale, softcap, offset,
              CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POST: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvh = h // (H // HKV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < head_dim
    qmask = (rows[:, None] < q_len) & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], mask=qmask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + dims[None, :], mask=qmask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh * q_len + rows, mask=rows < q_len, other=float("inf"))
    delta = tl.load(DELTA + bh * q_len + rows, mask=rows < q_len, other=0.0)
    t1, t2, t3, t4, b1, d1, b2, d2, aa, ac = load_scalars(TH, AF, h, sth, sah)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = k_len
    if CAUSAL:
        end = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + offset)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < k_len) & dmask[None, :]
        k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        p, ds, _ = tile_grads(q, k, v, do, lse, delta, scale, softcap, rows, cols, q_len, k_len, offset,
                              BIAS + b * sbb + h * sbh + rows[:, None] * sbm + cols[None, :],
                              POST + b * spb + h * sph + rows[:, None] * spm + cols[None, :],
                              t1, t2, t3, t4, b1, d1, b2, d2, aa, ac, CAUSAL, HAS_BIAS, HAS_POST, HAS_SOFTCAP, False)
        dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], dq, mask=qmask)
