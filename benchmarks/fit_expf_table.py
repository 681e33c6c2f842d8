"""The constants of ssm/_expf_table.h (the AVX-512 clone's float exp), recomputed.

e^r ~ c (1 + r + a2 r^2 + a3 r^3) on |r| <= 1.003 ln2/32: a relative-error minimax fit
by Lawson's iteratively reweighted least squares in float64 (a2, a3 free, the constant
and linear terms exact), c = 249/256; the tables T_j = 2^(j/16) / c as float bits plus
(64 << 23) - (j << 19), and d_j = ln(float(T_j)) - (j ln2/16 - ln c).

    python benchmarks/fit_expf_table.py
"""
import math

import numpy as np

N, C = 16, 249 / 256


def main():
    a = math.log(2) / (2 * N) * 1.003
    r = np.cos(np.linspace(0, np.pi, 20001)) * a
    f = np.exp(r)
    A = np.stack([r**2, r**3], 1) / f[:, None]
    b = (f - 1 - r) / f
    w = np.ones_like(r) / len(r)
    for _ in range(3000):
        sw = np.sqrt(w)
        co = np.linalg.lstsq(A * sw[:, None], b * sw, rcond=None)[0]
        w = w * np.abs(A @ co - b)
        w /= w.sum()
    a2, a3 = np.float32(C * co[0]), np.float32(C * co[1])
    rel = np.abs(C + C * r + float(a2) * r**2 + float(a3) * r**3 - C * f) / (C * f)
    hi = np.float32(math.log(2) / N)
    print(f"A3 {a3:.9g}  A2 {a2:.9g}  A1 {C:.9g}  max relative error {rel.max():.3g}")
    print(f"HI {hi:.9g}  LO {np.float32(math.log(2) / N - float(hi)):.9g}  "
          f"L2E {np.float32(N / math.log(2)):.9g}")
    scale, delta = [], []
    for j in range(N):
        t = np.float32(2 ** (j / N) / C)
        scale.append((int(t.view(np.uint32)) + (64 << 23) - (j << 19)) & 0xFFFFFFFF)
        delta.append(np.float32(math.log(float(t)) - (j * math.log(2) / N - math.log(C))))
    print("scale", ", ".join(f"0x{s:08x}u" for s in scale))
    print("delta", ", ".join(f"{d:.9g}f" for d in delta))


if __name__ == "__main__":
    main()
