"""time-onnx's seeded normal generator in Python (the algorithm documented in src/pipeline/rng.rs):
SplitMix64 seeding, xoshiro256++ bits, Box-Muller normals. With it a script draws exactly the
initial latents `time-onnx generate --seed N` draws, so the two can be compared image by image.
"""
from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1


def _splitmix64(z: int) -> tuple[int, int]:
    z = (z + 0x9E3779B97F4A7C15) & M64
    x = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return z, x ^ (x >> 31)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & M64


class Rng:
    def __init__(self, seed: int):
        z, self.s = seed & M64, []
        for _ in range(4):
            z, out = _splitmix64(z)
            self.s.append(out)

    def next_u64(self) -> int:
        s = self.s
        out = (_rotl((s[0] + s[3]) & M64, 23) + s[0]) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return out

    def open01(self) -> float:
        return ((self.next_u64() >> 11) + 0.5) * (1.0 / (1 << 53))

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        out = np.empty(n + (n & 1), np.float32)
        for i in range(0, n, 2):
            u1, u2 = self.open01(), self.open01()
            r = math.sqrt(-2.0 * math.log(u1))
            th = 2.0 * math.pi * u2
            out[i] = r * math.cos(th)
            out[i + 1] = r * math.sin(th)
        return out[:n].reshape(shape)
