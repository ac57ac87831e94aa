"""Bucket assignment for "bucket hash attention" (the seed article's reading of hash attention, not the paper's).

Every query and key vector gets an integer bucket id in ``0 .. 2**bits - 1``; a query reads the keys whose id
equals its own. Hash kinds:

  sha256   SHA-256 of the quantized vector (hashlib, one call per token per head on the CPU)
  blake3   keyed BLAKE3 of the quantized vector (the ``blake3`` package, one call per token per head)
  keyed    a keyed 64-bit integer mix of the same quantized bits, vectorized in torch (CPU or GPU, bit-exact
           on both: int64 arithmetic wraps identically everywhere)
  lsh      SimHash: the signs of ``bits`` random Gaussian projections (random hyperplanes), shared by a query
           head and its KV head, so nearby vectors tend to share a bucket
  hybrid   the article's recommendation: LSH gives the top ``coarse_bits`` bits (the coarse group), SHA-256 of
           (group, quantized vector) gives the remaining ``bits - coarse_bits`` (the final bucket)

Quantization (for the cryptographic and keyed kinds): ``round(x / quant_step)`` clamped to int16. A query and a
key share a cryptographic bucket only if their quantized vectors are identical, or by a chance collision
(probability 2**-bits): the hash is uniform by design, which is exactly why it cannot route by similarity.

Shapes: x [B, H, L, D] (H query heads or KV heads); ``kv_head`` [H] maps each row head to the KV head whose
randomness (LSH planes, hash key) it uses, so a query head and its KV head are hashed alike.
Output: int64 [R, B, H, L] (R = rounds, independent hash functions).
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

HASH_KINDS = ("sha256", "blake3", "keyed", "lsh", "hybrid")
CRYPTO_KINDS = ("sha256", "blake3")
MIN_BITS, MAX_BITS = 1, 32


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise ValueError(f"bucket bits must be an integer in {MIN_BITS}..{MAX_BITS} "
                         f"(2**bits buckets), got {bits!r}")
    return bits


def check_kind(kind) -> str:
    if kind not in HASH_KINDS:
        raise ValueError(f"unknown bucket hash {kind!r}; available: {', '.join(HASH_KINDS)}")
    return kind


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 (wrapping multiply; logical shifts emulated by masking the sign fill)."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def _signed64(v: int) -> int:
    """A Python int reduced mod 2**64 into the int64 range (torch scalars must fit)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


def quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    """Float vectors -> int16 grid values round(x / step) (clamped), the bits the hashes read."""
    return torch.round(x.float() / step).clamp_(-32768, 32767).to(torch.int16)


def _blake3():
    try:
        import blake3
    except ImportError:  # clear message instead of a silent substitute
        raise ImportError("bucket hash 'blake3' needs the blake3 package: pip install blake3") from None
    return blake3.blake3


class BucketHasher:
    """Deterministic bucket ids for one configuration; the randomness is a pure function of
    (seed, layer, round, kv head), so every process and device derives the same planes and keys."""

    def __init__(self, kind: str = "lsh", bits: int = 16, rounds: int = 1, seed: int = 0,
                 quant_step: float = 0.125, coarse_bits: int | None = None):
        self.kind = check_kind(kind)
        self.bits = check_bits(bits)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        self.rounds = rounds
        self.seed = int(seed)
        if not (isinstance(quant_step, (int, float)) and quant_step > 0):
            raise ValueError(f"quant_step must be a positive number, got {quant_step!r}")
        self.quant_step = float(quant_step)
        if coarse_bits is None:
            coarse_bits = max(1, bits // 2)
        if kind == "hybrid" and (not isinstance(coarse_bits, int) or not (1 <= coarse_bits <= bits)):
            raise ValueError(f"hybrid coarse_bits must be an integer in 1..bits ({bits}), got {coarse_bits!r}")
        self.coarse_bits = coarse_bits
        if kind == "blake3":
            _blake3()
        self._planes: dict = {}

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    def describe(self) -> str:
        extra = f",coarse={self.coarse_bits}" if self.kind == "hybrid" else ""
        return f"{self.kind},b={self.bits},R={self.rounds}{extra}"

    # -- randomness ----------------------------------------------------------------------------------
    def _key(self, layer: int, rnd: int, head: int) -> bytes:
        return struct.pack("<4q", self.seed, layer, rnd, head)

    def planes(self, layer: int, num_kv: int, d: int, nbits: int, device) -> torch.Tensor:
        """Gaussian hyperplanes [R, Hkv, D, nbits] for one layer (CPU generator: same on every device)."""
        key = (layer, num_kv, d, nbits)
        p = self._planes.get(key)
        if p is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 7919 + nbits)
            p = torch.randn(self.rounds, num_kv, d, nbits, generator=g)
            self._planes[key] = p
        return p.to(device)

    # -- hashes --------------------------------------------------------------------------------------
    def _simhash(self, layer, x, kv_head, num_kv, nbits) -> torch.Tensor:
        """[R, B, H, L] codes from the signs of nbits projections (bit i = projection i > 0)."""
        p = self.planes(layer, num_kv, x.shape[-1], nbits, x.device)[:, kv_head]  # [R, H, D, nbits]
        proj = torch.einsum("bhld,rhdn->rbhln", x.float(), p)
        weights = (1 << torch.arange(nbits, device=x.device, dtype=torch.int64))
        return ((proj > 0).to(torch.int64) * weights).sum(-1)

    def _crypto(self, layer, x, kv_head, kind, prefix=None, nbits=None) -> torch.Tensor:
        """Per-row cryptographic hash of (key, [prefix], quantized vector) truncated to nbits. CPU loop over
        rows (tokens x heads): hashlib has no batched form, and that cost is part of what we measure."""
        nbits = self.bits if nbits is None else nbits
        b, h, L, d = x.shape
        qx = quantize(x, self.quant_step).cpu().numpy()  # [B, H, L, D] int16
        pre = None if prefix is None else prefix.cpu().numpy()  # [R, B, H, L]
        out = np.empty((self.rounds, b, h, L), dtype=np.int64)
        mask = (1 << nbits) - 1
        heads = kv_head.tolist()
        b3 = _blake3() if kind == "blake3" else None
        for r in range(self.rounds):
            for hi in range(h):  # heads x batch x tokens rows, each one hash call
                key = self._key(layer, r, heads[hi])
                keyed = hashlib.sha256(key).digest()  # 32-byte key for keyed BLAKE3
                for bi in range(b):
                    rows = qx[bi, hi]
                    for li in range(L):
                        data = rows[li].tobytes()
                        if pre is not None:
                            data = struct.pack("<q", int(pre[r, bi, hi, li])) + data
                        if b3 is not None:
                            dig = b3(data, key=keyed).digest(8)
                        else:
                            dig = hashlib.sha256(key + data).digest()
                        out[r, bi, hi, li] = int.from_bytes(dig[:8], "little") & mask
        return torch.from_numpy(out).to(x.device)

    def _keyed(self, layer, x, kv_head) -> torch.Tensor:
        """Keyed integer hash of the quantized bits, vectorized: h = mix(sum_j mix(x_j*C1 + j*C2 + key)).
        The wrapping int64 sum is order-independent, position j enters each term, so it is exact and the
        same on CPU and GPU."""
        qx = quantize(x, self.quant_step).to(torch.int64)  # [B, H, L, D]
        d = x.shape[-1]
        j = torch.arange(d, device=x.device, dtype=torch.int64) * 0x2545F4914F6CDD1D
        r = torch.arange(self.rounds, device=x.device, dtype=torch.int64).view(-1, 1, 1, 1, 1)
        base = _signed64(self.seed * 0x632BE59BD9B4E019 + layer * 0x3C6EF372FE94F82B)
        key = _mix64(r * 0x1F83D9ABFB41BD6B + kv_head.to(x.device).view(1, 1, -1, 1, 1) * 0x5BE0CD19137E2179
                     + base)  # [R, 1, H, 1, 1]
        e = _mix64(qx.unsqueeze(0) * -0x61C8864680B583EB + j + key)  # [R, B, H, L, D]
        hsh = _mix64(e.sum(-1) ^ key.squeeze(-1))
        return hsh & self.mask

    def __call__(self, layer: int, x: torch.Tensor, kv_head: torch.Tensor, num_kv: int) -> torch.Tensor:
        """Bucket ids int64 [R, B, H, L] of x [B, H, L, D]."""
        if x.dim() != 4:
            raise ValueError(f"x must be [B, H, L, D], got {tuple(x.shape)}")
        kv_head = kv_head.to(torch.int64)
        if self.kind == "lsh":
            return self._simhash(layer, x, kv_head, num_kv, self.bits)
        if self.kind == "keyed":
            return self._keyed(layer, x, kv_head)
        if self.kind in CRYPTO_KINDS:
            return self._crypto(layer, x, kv_head, self.kind)
        # hybrid: coarse LSH group in the top bits, SHA-256 of (group, quantized vector) for the rest
        c = self.coarse_bits
        coarse = self._simhash(layer, x, kv_head, num_kv, c)
        if c == self.bits:
            return coarse
        fine = self._crypto(layer, x, kv_head, "sha256", prefix=coarse, nbits=self.bits - c)
        return (coarse << (self.bits - c)) | fine
