"""A naive float64 implementation of the DESIGN.md operator, written independently of attn_mod.kernels:
explicit loops over batch, head and query row; no chunking, no GQA reshapes, no shared helpers.

block (B, K) ids (0 = none) and window (int) follow DESIGN's visibility rule written out per key: query row i sits
at key position p = K - Q + i; key j is hidden when PAD, when causal and j > p unless p >= 0 and block[j] ==
block[p] != 0, and when window is set and p - j >= window."""

import math

import torch


def naive_attention(q, k, v, cat, mul, absw, add, w, renorm, *, scale, causal, row_enable=None,
                    head_enable=None, num_categories=8, block=None, window=None):
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, Q, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Q), -math.inf, dtype=torch.float64)
    mass = torch.zeros(B, Hq, Q, num_categories, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // group
            for i in range(Q):
                on = (row_enable is None or bool(row_enable[b, i])) and (head_enable is None or bool(head_enable[h]))
                cols, scores = [], []
                for j in range(K):
                    c = int(cat[b, j])
                    p = K - Q + i
                    same_block = block is not None and p >= 0 and int(block[b, j]) != 0 and \
                        int(block[b, j]) == int(block[b, p])
                    if c == 0 or (causal and j > p and not same_block):
                        continue
                    if window is not None and p - j >= window:
                        continue
                    s = scale * float(q[b, h, i] @ k[b, kh, j])
                    if on:
                        s = float(mul[c]) * s + float(absw[c]) * abs(s) + float(add[c])
                    cols.append(j)
                    scores.append(s)
                if not cols:
                    continue
                t = torch.tensor(scores, dtype=torch.float64)
                p = torch.softmax(t, 0)
                ws = torch.tensor([float(w[int(cat[b, j])]) if on else 1.0 for j in cols], dtype=torch.float64)
                pw = ws * p
                if on and renorm:
                    if pw.sum() == 0:
                        continue
                    pw = pw / pw.sum()
                    lse[b, h, i] = torch.logsumexp(t + torch.log(ws), 0)
                else:
                    lse[b, h, i] = torch.logsumexp(t, 0)
                for jj, j in enumerate(cols):
                    out[b, h, i] += pw[jj] * v[b, kh, j]
                    mass[b, h, i, int(cat[b, j])] += pw[jj]
    return out, lse, mass
