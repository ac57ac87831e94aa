"""The learned maps ``phi_q`` and ``phi_kv`` of HashAttention, for every layer and head at once.

Each map is a per-head MLP ``in -> hidden -> ... -> bits`` with SiLU between layers (paper default:
head_dim -> 128 -> 128 -> 32). Weights of all layers and heads are stacked, so one layer's map is a batched
matmul over heads (no Python loop over heads):

    w[i]: [num_layers, heads, d_in_i, d_out_i]      b[i]: [num_layers, heads, d_out_i]

``phi_q`` has one MLP per query head. ``phi_kv`` has one per *signature head*: per KV head by default
(32 bits per cached token per KV head), or per query head when imported from the authors' layout.
With ``value_norm=True`` the key map also reads log||v|| (the paper's Lemma 4.2), so d_in = head_dim + 1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .signatures import check_bits, pack_signs


@dataclass
class MapsConfig:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    bits: int = 32
    hidden: int = 128
    depth: int = 3  # number of Linear layers; depth 1 = a single projection (SimHash when untrained)
    key_heads: int | None = None  # heads of phi_kv: num_kv_heads (default) or num_q_heads
    value_norm: bool = False
    bias: bool = True
    model_id: str = ""
    model_type: str = ""
    extra: dict = field(default_factory=dict)  # training facts and other provenance

    def __post_init__(self):
        check_bits(self.bits)
        if self.key_heads is None:
            self.key_heads = self.num_kv_heads
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "hidden", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"MapsConfig.{name} must be a positive integer, got {v!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.key_heads not in (self.num_kv_heads, self.num_q_heads):
            raise ValueError(f"key_heads must be num_kv_heads ({self.num_kv_heads}) or num_q_heads "
                             f"({self.num_q_heads}), got {self.key_heads}")

    @property
    def words(self) -> int:
        return self.bits // 32

    def dims(self, key: bool) -> list[int]:
        d_in = self.head_dim + (1 if key and self.value_norm else 0)
        return [d_in] + [self.hidden] * (self.depth - 1) + [self.bits]

    def to_dict(self) -> dict:
        return asdict(self)


class _StackedMLP(nn.Module):
    def __init__(self, layers: int, heads: int, dims: list[int], bias: bool, init: bool = True):
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(layers, heads, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(layers, heads, b)) for b in dims[1:]) if bias else None
        for w in self.weights if init else ():  # Kaiming-uniform like nn.Linear, per head
            bound = 1.0 / math.sqrt(w.shape[-2])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, N, d_in] -> [B, H, N, bits] (pre-sign projections)."""
        n = len(self.weights)
        for i, w in enumerate(self.weights):
            x = torch.matmul(x, w[layer].to(x.dtype))  # [B,H,N,a] @ [H,a,b] broadcasts over B
            if self.biases is not None:
                x = x + self.biases[i][layer].to(x.dtype)[:, None, :]
            if i < n - 1:
                x = torch.nn.functional.silu(x)
        return x


class HashMaps(nn.Module):
    """``phi_q`` and ``phi_kv`` for all layers of one model. See the module docstring for shapes."""

    def __init__(self, config: MapsConfig, init: bool = True):
        """``init=False`` leaves the weights uninitialized (they are about to be loaded or copied) and does
        not touch the global random generator."""
        super().__init__()
        self.config = config
        c = config
        self.q = _StackedMLP(c.num_layers, c.num_q_heads, c.dims(key=False), c.bias, init)
        self.k = _StackedMLP(c.num_layers, c.key_heads, c.dims(key=True), c.bias, init)
        #: {selection: core.calibration.Calibration} for the adaptive budget (weights.load_maps reads them)
        self.calibrations = {}

    @classmethod
    def simhash(cls, config: MapsConfig, seed: int = 0) -> "HashMaps":
        """Untrained random-projection signatures (SimHash): one Gaussian matrix per KV head shared by the
        query heads of its group and by the keys, so matching bits estimate the query-key angle."""
        c = MapsConfig(**{**config.to_dict(), "depth": 1, "bias": False, "value_norm": False,
                          "key_heads": config.num_kv_heads})
        maps = cls(c, init=False)  # every weight is set below; the global RNG stays untouched
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(c.num_layers, c.num_kv_heads, c.head_dim, c.bits, generator=g)
        group = c.num_q_heads // c.num_kv_heads
        with torch.no_grad():
            maps.k.weights[0].copy_(proj)
            maps.q.weights[0].copy_(proj.repeat_interleave(group, dim=1))
        c.extra = {**c.extra, "kind": "simhash", "seed": seed}
        return maps

    def take_layers(self, layers: list) -> "HashMaps":
        """A copy holding only these layers' maps (a list of indices, in that order)."""
        from copy import deepcopy
        bad = [i for i in layers if not 0 <= i < self.config.num_layers]
        if bad or not layers:
            raise ValueError(f"layers {bad or layers} are not layers of these maps (0..{self.config.num_layers - 1})")
        c = deepcopy(self.config)
        c.num_layers = len(layers)
        out = HashMaps(c, init=False)
        out.load_state_dict({k: v[list(layers)].clone() for k, v in self.state_dict().items()})
        return out.to(self.q.weights[0].device)

    def put_layers(self, layers: list, part: "HashMaps"):
        """Write ``part`` (from :meth:`take_layers` with the same list) back into these layers."""
        with torch.no_grad():
            for dst, src in zip(self.state_dict(keep_vars=True).values(), part.state_dict().values()):
                dst[list(layers)] = src.to(dst.dtype).to(dst.device)

    def _key_input(self, k: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
        if not self.config.value_norm:
            return k
        if v is None:
            raise ValueError("these maps read log||v|| (value_norm=True): pass the values too")
        lognorm = torch.log(v.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(k.dtype)
        return torch.cat([k, lognorm], dim=-1)

    def _check(self, x: torch.Tensor, heads: int, what: str):
        if x.dim() != 4 or x.shape[1] != heads or x.shape[-1] != self.config.head_dim:
            raise ValueError(f"{what} must be [batch, {heads}, tokens, {self.config.head_dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")

    def project_q(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, N, D] -> real-valued [B, Hq, N, bits]."""
        self._check(q, self.config.num_q_heads, "queries")
        return self.q(layer, q.to(self._dtype()))

    def project_k(self, layer: int, k: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """k (and v): [B, key_heads, N, D] -> real-valued [B, key_heads, N, bits]."""
        self._check(k, self.config.key_heads, "keys")
        dt = self._dtype()
        return self.k(layer, self._key_input(k.to(dt), None if v is None else v.to(dt)))

    def _dtype(self):
        return self.q.weights[0].dtype

    @torch.no_grad()
    def query_signature(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Packed int32 [B, Hq, N, bits // 32]."""
        return pack_signs(self.project_q(layer, q))

    @torch.no_grad()
    def key_signature(self, layer: int, k: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """Packed int32 [B, key_heads, N, bits // 32]."""
        return pack_signs(self.project_k(layer, k, v))


def soft_sign(x: torch.Tensor) -> torch.Tensor:
    """Training relaxation of sign(x)."""
    return torch.tanh(x)
