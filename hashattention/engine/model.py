"""A gpt-fast-style Llama for fast decoding, dense or HashAttention, in one file.

Everything the decode step touches is preallocated with static shapes, so one step is a fixed sequence of
kernels that a CUDA graph can replay without host syncs:

    k_cache, v_cache: [L, B, Hkv, S, D]   model dtype      (S = max_seq_len, the cache length)
    sig_cache:        [L, B, Hsig, S, W]  int32            (HashAttention: W = bits // 32 words per token)
    cos, sin:         [S, D]              fp32 rotary tables (made by transformers' own rotary class, so
                                                           llama3 / linear / dynamic scaling all match)

All sequences of a batch share one position (equal-length prompts, no padding), as in gpt-fast.

Prefill is dense (SDPA, causal), in chunks of ``prefill_chunk`` tokens; the keys it writes are signed at
the same time. Decode is one token per sequence; on CUDA each layer is about a dozen kernels (fused RMSNorm +
residual, rotary + cache write, silu * up, cuBLAS matmuls; :mod:`hashattention.engine.kernels`):

  - ``dense``: split-K flash decoding over the first ``pos + 1`` cache rows.
  - ``hash``:  one kernel signs the step's query heads with phi_q and its key heads with phi_kv (written to
    the signature cache); then the library's two decode kernels (:mod:`hashattention.kernels`):
    ``score_select`` scores the signature cache (bit matches summed over the query heads of a KV group, one
    selection per KV head) and selects by counting into a *fixed-size* list of K = sink + window + heavy
    token indices (heavy = the budget at the cache length, static; the count actually read follows the
    current length), and ``sparse_decode`` attends over it. The selection is the shared rule of
    :func:`hashattention.core.selection.select`: sink and window always read, the heavy budget at the
    *current* length (a fraction of it, or a count) goes to the highest scores, ties to the most recent
    token. So the engine reads exactly what the Hugging Face integration reads.
  - ``none`` and ``hash-fixed`` (sparse attention over a fixed selection) are ablations for time breakdowns.

Without CUDA (or with ``HASHATTENTION_ENGINE_KERNELS=torch``) the same step runs on PyTorch references.

Supported: Hugging Face ``llama``, ``mistral`` (no sliding window) and ``qwen2`` (q/k/v bias) models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.budget import Budget
from ..core.selection import DEFAULT_GROUP_SELECTION
from ..core.maps import HashMaps
from ..kernels import score_select, sparse_decode
from ..kernels.sparse_decode import DTYPES as SPARSE_DTYPES
from ..kernels.reference import score_select_reference, sparse_decode_reference
from . import kernels
from .config import (PRESET_ALIASES, PRESETS, SUPPORTED_MODEL_TYPES, CacheError, EngineConfig,  # noqa: F401
                     UnsupportedModelError, preset_config, preset_names)

ATTENTION_MODES = ("dense", "hash", "none", "hash-fixed")
#: offload: the GPU heavy-row cache holds this many times the heavy budget per KV head unless told otherwise
ROW_CACHE_FACTOR = 2


def rotary_tables(hf_config, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [length, D] from transformers' rotary class for this config (exactly what HF applies)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rot = LlamaRotaryEmbedding(hf_config)
    pos = torch.arange(length, dtype=torch.int64)[None]
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos[0].to(device), sin[0].to(device)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as transformers' LlamaRMSNorm: normalize in fp32, cast back, then scale
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: EngineConfig):
        super().__init__()
        self.c = c
        self.wqkv = nn.Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, bias=c.attention_bias)
        self.wo = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, c: EngineConfig):
        super().__init__()
        self.w13 = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)  # gate and up in one matmul
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        g, u = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, c: EngineConfig):
        super().__init__()
        self.attention = Attention(c)
        self.mlp = MLP(c)
        self.attention_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.ffn_norm = nn.Parameter(torch.ones(c.hidden_size))


class Transformer(nn.Module):
    """The model plus its static caches. Build with :meth:`from_hf` / :meth:`random`, then
    :meth:`setup_caches`, then :meth:`prefill` and :meth:`decode_step` (or use
    :class:`hashattention.engine.generate.Generator`)."""

    def __init__(self, c: EngineConfig, hf_config):
        super().__init__()
        self.c = c
        self.hf_config = hf_config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.batch = self.max_seq_len = 0
        self.maps = None
        self.budget = None
        self.k_cache = self.v_cache = self.sig_cache = self.host_kv = None
        self._q_drift = None  # benchmarks: synthetic drifting query signatures (set_query_drift)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def random(cls, hf_config, device=None, dtype=torch.bfloat16, seed: int = 0) -> "Transformer":
        """Random weights of the right shapes and a sane scale (for speed measurements: no download)."""
        c = EngineConfig.from_hf(hf_config)
        with torch.device("meta"):
            m = cls(c, hf_config)
        m = m.to_empty(device=device or "cpu").to(dtype)._tie()
        g = torch.Generator(device=m.norm.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0) if "norm" in name else p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return m.eval()

    @classmethod
    def from_hf(cls, hf_model, device=None, dtype=None) -> "Transformer":
        """Copy the weights of a transformers LlamaForCausalLM-like model (e.g. from
        :func:`hashattention.models.load_model`) into an engine model."""
        cfg = hf_model.config
        c = EngineConfig.from_hf(cfg)
        src = hf_model.model
        p0 = next(hf_model.parameters())
        device = torch.device(device) if device is not None else p0.device
        dtype = dtype or p0.dtype
        with torch.device("meta"):
            m = cls(c, cfg)
        m = m.to_empty(device=device).to(dtype)._tie()
        with torch.no_grad():
            m.embed.weight.copy_(src.embed_tokens.weight)
            for blk, hl in zip(m.layers, src.layers):
                a = hl.self_attn
                blk.attention.wqkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                if c.attention_bias:
                    blk.attention.wqkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
                blk.attention.wo.weight.copy_(a.o_proj.weight)
                blk.mlp.w13.weight.copy_(torch.cat([hl.mlp.gate_proj.weight, hl.mlp.up_proj.weight]))
                blk.mlp.w2.weight.copy_(hl.mlp.down_proj.weight)
                blk.attention_norm.copy_(hl.input_layernorm.weight)
                blk.ffn_norm.copy_(hl.post_attention_layernorm.weight)
            m.norm.copy_(src.norm.weight)
            if not c.tie_word_embeddings:
                m.lm_head.weight.copy_(hf_model.lm_head.weight)
        return m.eval()

    def _tie(self) -> "Transformer":
        # to_empty() / .to() give the head its own tensor: share the embedding again when the model ties them
        if self.c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        return self

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    # -- caches --------------------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_seq_len: int, maps: HashMaps | None = None,
                     budget: Budget | None = None, check_memory: bool = True, selection: str | None = None,
                     offload: str | None = None, gpu_layers: int | None = None, row_cache: int | None = None,
                     host_memory: int | None = None, dense_baseline: bool = False, offload_read: str = "gather",
                     _host_device=None):
        """Allocate the static caches for ``batch`` sequences of up to ``max_seq_len`` tokens (prompt plus
        generated), and the signature cache when ``maps`` are given. Checks the memory *before* allocating.

        offload="host" (CUDA only): the K/V of layers ``gpu_layers``.. live in pinned host memory, with the
        signatures, sink, window and a cache of ``row_cache`` heavy rows per KV head (default ROW_CACHE_FACTOR x
        the heavy budget) on the GPU (:mod:`hashattention.engine.offload`). gpu_layers: None = as many as the
        card's free memory holds. offload_read: "gather" (the heavy-row cache above) or "direct" (no GPU copy
        of host rows at all: kernel 2 reads every selected row of a host layer from pinned memory, zero-copy;
        for measurements).
        host_memory: bytes of host memory to allow (default: what the OS reports available). Offload
        needs maps (HashAttention); ``dense_baseline=True`` allows it without them, for the FlexGen-style dense
        baseline (mode "dense" streams every host row every step). ``_host_device``: test hook only (a plain
        CPU tensor stands in for pinned memory, no CUDA needed).
        """
        from .memory import cache_bytes, check_fits, kv_bytes_per_token
        from .offload import HostKV
        c = self.c
        if not isinstance(batch, int) or batch < 1:
            raise CacheError(f"batch must be a positive integer, got {batch!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise CacheError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        if maps is not None:
            mc = maps.config
            want = (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim)
            got = (mc.num_layers, mc.num_q_heads, mc.num_kv_heads, mc.head_dim)
            if got != want:
                raise ValueError(f"maps (layers, q heads, kv heads, head_dim) = {got} do not fit the model {want}")
        if c.sliding_window is not None and max_seq_len > c.sliding_window:
            raise UnsupportedModelError(f"this {c.model_type} model attends through a sliding window of "
                                        f"{c.sliding_window} tokens; the engine has none: use max_seq_len <= "
                                        f"{c.sliding_window}")
        self.k_cache = self.v_cache = self.sig_cache = self.host_kv = None  # free the old caches first
        self._q_drift = None
        mcfg = maps.config if maps is not None else None
        need = cache_bytes(c, batch, max_seq_len, self.dtype, mcfg)
        n_gpu, slots = c.num_layers, 0
        if offload is not None:  # every check before anything is allocated
            if offload_read not in ("gather", "direct"):
                raise ValueError(f"offload_read must be 'gather' or 'direct', got {offload_read!r}")
            direct = offload_read == "direct"
            n_gpu, slots, gpu_kv = self._plan_offload(batch, max_seq_len, maps if not direct else None, budget,
                                                      offload, gpu_layers, row_cache, host_memory,
                                                      dense_baseline or (direct and maps is not None), _host_device,
                                                      need - kv_bytes_per_token(c, self.dtype) * batch * max_seq_len,
                                                      check_memory)
            need = need - kv_bytes_per_token(c, self.dtype) * batch * max_seq_len + gpu_kv
        if check_memory and self.device.type == "cuda":
            check_fits(need, self.device, what=f"caches for batch {batch} x {max_seq_len} tokens"
                       + (f" ({n_gpu} of {c.num_layers} layers' K/V on the GPU)" if offload is not None else ""))
        kv_shape = (n_gpu, batch, c.num_kv_heads, max_seq_len, c.head_dim)
        self.k_cache = torch.zeros(kv_shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(kv_shape, device=self.device, dtype=self.dtype)
        if offload is not None:
            b = budget if budget is not None else Budget()
            self.host_kv = HostKV(c.num_layers, list(range(n_gpu, c.num_layers)), batch, max_seq_len,
                                  c.num_kv_heads, c.head_dim, self.dtype, self.device, b.sink, b.window, slots,
                                  hash_mode=maps is not None and offload_read == "gather")
            self.host_kv.direct = maps is not None and offload_read == "direct"
        self.batch, self.max_seq_len = batch, max_seq_len
        cos, sin = rotary_tables(self.hf_config, max_seq_len, self.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.maps = self.budget = self.sig_cache = None
        if maps is not None:
            mc = maps.config
            self.maps = maps.to(self.device).eval()
            self.sig_cache = torch.zeros(c.num_layers, batch, mc.key_heads, max_seq_len, mc.words,
                                         device=self.device, dtype=torch.int32)
            self.set_budget(budget if budget is not None else Budget(), selection)
        self._stack_maps()

    def _plan_offload(self, batch, seq, maps, budget, offload, gpu_layers, row_cache, host_memory,
                      dense_baseline, host_device, gpu_fixed, check_memory):
        """Checks of an offload request and its placement: (GPU layers, heavy-row cache slots, GPU bytes of the
        K/V placement). Raises before anything is allocated."""
        from .memory import RESERVE_BYTES
        from .offload import host_available_bytes, offload_bytes
        c = self.c
        if offload != "host":
            raise ValueError(f"offload must be None or 'host', got {offload!r}")
        if host_device is None and self.device.type != "cuda":
            raise CacheError("offload='host' keeps the K/V in pinned host memory read by the GPU: it needs a CUDA "
                             f"device, the model is on {self.device}")
        if self.device.type == "cuda" and not kernels.use_triton(torch.empty(1, device=self.device)):
            raise CacheError("offload='host' on CUDA runs on the Triton kernels (they read pinned memory inside the "
                             "CUDA graph): unset HASHATTENTION_ENGINE_KERNELS=torch")
        if maps is None and not dense_baseline:
            raise ValueError("offload='host' reads only the selected rows over PCIe: it needs maps (HashAttention); "
                             "dense attention with offloaded K/V is the FlexGen-style baseline only "
                             "(dense_baseline=True)")
        b = budget if budget is not None else Budget()
        slots = 0
        if maps is not None:
            if b.residual:
                raise ValueError("offload does not support a residual sample (Budget(residual=...))")
            heavy = int(min(max(b.heavy_count(seq), 0), seq))
            # default 2x heavy: on real text (8K, 1/32) 81% of the heavy rows hit against 64% at 1x, half the
            # transfers for a few GiB of GPU memory at most (docs/performance.md)
            slots = ROW_CACHE_FACTOR * heavy if row_cache is None else int(row_cache)
            if slots < heavy:
                raise CacheError(f"the heavy budget selects up to {heavy} rows per KV head, more than the GPU row "
                                 f"cache stages ({slots} slots): use row_cache >= {heavy} or a smaller heavy budget")
            slots = max(slots, 1)
        elt = self.dtype.itemsize
        args = (c.num_layers, batch, seq, c.num_kv_heads, c.head_dim, elt, b.sink, b.window, slots, maps is not None)

        def split(g):
            return offload_bytes(args[0], g, *args[1:])
        if gpu_layers is None:
            gpu_layers = 0
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                while gpu_layers < c.num_layers and \
                        gpu_fixed + split(gpu_layers + 1)[0] + RESERVE_BYTES <= free:
                    gpu_layers += 1
        if not isinstance(gpu_layers, int) or not 0 <= gpu_layers <= c.num_layers:
            raise ValueError(f"gpu_layers must be an integer in 0..{c.num_layers}, got {gpu_layers!r}")
        gpu, host = split(gpu_layers)
        avail = host_memory if host_memory is not None else host_available_bytes()
        if check_memory and host > avail:
            raise CacheError(f"K/V in host memory for batch {batch} x {seq} tokens ({c.num_layers - gpu_layers} of "
                             f"{c.num_layers} layers) needs {_size(host)} of host memory, {_size(avail)} are "
                             "available: use a smaller batch or context, or more layers on the GPU")
        return gpu_layers, slots, gpu

    def offload_stats(self) -> dict:
        """Heavy-row cache counters since the last prefill (one device sync): lookups, hits, hit rate, rows and
        bytes fetched from host memory (K and V)."""
        hk = self.host_kv
        if hk is None or not (hk.hash_mode or hk.direct):
            return {}
        lookups, hits = (int(x) for x in hk.stats.tolist())
        misses = lookups - hits
        return {"lookups": lookups, "hits": hits, "hit_rate": hits / lookups if lookups else float("nan"),
                "rows_fetched": misses, "bytes_fetched": misses * 2 * self.c.head_dim * self.dtype.itemsize,
                "host_layers": len(hk.host_layers), "gpu_layers": self.c.num_layers - len(hk.host_layers),
                "row_cache": hk.slots}

    def set_budget(self, budget: Budget, selection: str | None = None):
        """The HashAttention budget; K = sink + window + heavy(max_seq_len) index slots per KV head.
        ``selection``: how a KV group's query heads share one selection ("sum" or "max" of their bit matches;
        default the library's, core.selection.DEFAULT_GROUP_SELECTION)."""
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a hashattention.Budget, got {type(budget).__name__}")
        if budget.adaptive:  # its kernels and index slots take one heavy count per sequence
            raise ValueError("the engine reads a fixed heavy count: an adaptive budget (top_p, min_share) runs through the "
                             "Hugging Face integration (HashAttentionPolicy) only")
        selection = selection or DEFAULT_GROUP_SELECTION
        if selection not in ("sum", "max"):
            raise ValueError(f"the engine shares one selection per KV group: selection 'sum' or 'max', "
                             f"got {selection!r}")
        self.budget, self.selection = budget, selection
        s = self.max_seq_len
        heavy = int(min(max(budget.heavy_count(s), 0), s))
        hk = getattr(self, "host_kv", None)
        if hk is not None and hk.hash_mode and (heavy > hk.slots or budget.sink != hk.sink
                                                or budget.window != hk.window):
            raise CacheError(f"the offload working set was sized for sink {hk.sink}, window {hk.window} and "
                             f"{hk.slots} heavy rows: budget {budget.describe()} needs setup_caches again")
        self.heavy_slots = heavy

    def _stack_maps(self):
        """phi_q and phi_kv weights of each layer stacked over heads, so one batched matmul per Linear signs
        the new query heads and key heads of a step together (when both maps have the same layer sizes)."""
        self._fused_maps = None
        if self.maps is None:
            return
        mc = self.maps.config
        if mc.value_norm or mc.dims(True) != mc.dims(False) or (mc.bias and self.maps.q.biases is None):
            return
        ws, bs = [], []
        for i in range(len(self.maps.q.weights)):
            # fp32: the fused kernel multiplies in fp32 (tf32x3), whatever dtype the maps were stored in
            ws.append(torch.cat([self.maps.q.weights[i], self.maps.k.weights[i]], dim=1).detach().float())
            if mc.bias:
                bs.append(torch.cat([self.maps.q.biases[i], self.maps.k.biases[i]], dim=1).detach().float()[:, :, None, :])
        self._fused_maps = (ws, bs if mc.bias else None)

    def _triton_maps_ok(self) -> bool:
        """The fused Triton maps kernel handles depth 1-3 MLPs with power-of-two sizes >= 16."""
        if self._fused_maps is None:
            return False
        ws = self._fused_maps[0]
        sizes = [ws[0].shape[-2]] + [w.shape[-1] for w in ws]
        return len(ws) <= 3 and all(n >= 16 and n & (n - 1) == 0 for n in sizes)

    def _signatures(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q [B, Hq, T, D], k, v [B, Hkv, T, D] -> packed (q_sig [B, Hq, T, W], k_sig [B, Hsig, T, W])."""
        mc = self.maps.config
        if mc.key_heads != k.shape[1]:  # authors' layout: one key map per query head
            rep = mc.key_heads // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if self._fused_maps is None:
            return (self.maps.query_signature(layer, q),
                    self.maps.key_signature(layer, k, v if mc.value_norm else None))
        ws, bs = self._fused_maps
        x = torch.cat([q, k], dim=1).to(ws[0].dtype)  # [B, Hq+Hs, T, D]
        for i, w in enumerate(ws):
            x = torch.matmul(x, w[layer]) if bs is None else torch.matmul(x, w[layer]) + bs[i][layer]
            if i < len(ws) - 1:
                x = F.silu(x)
        sig = kernels.pack_signs32(x)
        return sig[:, :q.shape[1]], sig[:, q.shape[1]:]

    def _check_caches(self):
        if self.k_cache is None:
            raise CacheError("call setup_caches(batch, max_seq_len) first")

    # -- forward -------------------------------------------------------------------------------------
    def _qkv(self, blk: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D] (rotary applied to q and k together)."""
        c = self.c
        b, t, _ = x.shape
        qkv = blk.attention.wqkv(_rms_norm(x, blk.attention_norm, c.rms_norm_eps))
        qkv = qkv.view(b, t, c.num_heads + 2 * c.num_kv_heads, c.head_dim).transpose(1, 2)
        nqk = c.num_heads + c.num_kv_heads
        qk, v = qkv[:, :nqk], qkv[:, nqk:]
        qk = qk * cos + _rotate_half(qk) * sin  # cos, sin [T, D] in the model dtype, as HF applies them
        return qk[:, :c.num_heads], qk[:, c.num_heads:], v

    def _finish(self, blk: Block, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn [B, Hq, T, D] -> residual, MLP, residual."""
        b, hq, t, d = attn.shape
        x = x + blk.attention.wo(attn.transpose(1, 2).reshape(b, t, hq * d))
        return x + blk.mlp(_rms_norm(x, blk.ffn_norm, self.c.rms_norm_eps))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(_rms_norm(x, self.norm, self.c.rms_norm_eps)).float()

    def check_prompts(self, input_ids: torch.Tensor) -> tuple[int, int]:
        """input_ids must be [batch, tokens] with the caches' batch; returns (batch, tokens)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if b != self.batch:
            raise CacheError(f"the caches were set up for batch {self.batch}, got {b} prompts")
        return b, t

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Dense prefill of equal-length prompts ``input_ids`` [B, T] into empty caches; keys are signed
        as they are written. Returns the logits of the last position [B, V] (fp32)."""
        self._check_caches()
        _, t = self.check_prompts(input_ids)
        if t < 1:
            raise ValueError("empty prompt")
        if t >= self.max_seq_len:
            raise CacheError(f"prompt of {t} tokens leaves no room in a cache of {self.max_seq_len} tokens "
                             "(max_seq_len counts the prompt and the generated tokens)")
        c = self.c
        ids = input_ids.to(self.device)
        hk = self.host_kv
        if hk is not None:
            hk.reset()
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            x = self.embed(ids[:, s:e])
            for li, blk in enumerate(self.layers):
                q, k, v = self._qkv(blk, x, self.cos[s:e].to(x.dtype), self.sin[s:e].to(x.dtype))
                hi = hk.index[li] if hk is not None else -1
                if hi >= 0:  # a host layer: the chunk goes to host memory (and the sink / window on the GPU)
                    hk.write_chunk(hi, s, k, v)
                else:
                    self.k_cache[li, :, :, s:e] = k
                    self.v_cache[li, :, :, s:e] = v
                if self.maps is not None:
                    self.sig_cache[li, :, :, s:e] = self._signatures(li, q, k, v)[1]
                if s == 0:
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.group > 1)
                else:  # later chunks: queries s..e-1 against keys 0..e-1, a boolean causal mask
                    kc, vc = hk.read_prefix(hi, e, self.device) if hi >= 0 else \
                        (self.k_cache[li, :, :, :e], self.v_cache[li, :, :, :e])  # host: one copy per chunk
                    kk = kc.repeat_interleave(c.group, 1)
                    vv = vc.repeat_interleave(c.group, 1)
                    mask = (torch.arange(e, device=self.device)[None, :]
                            <= torch.arange(s, e, device=self.device)[:, None])
                    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
                x = self._finish(blk, x, o)
        return self.logits(x[:, -1])

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, mode: str = "dense",
                    fixed_index: tuple | None = None) -> torch.Tensor:
        """One token per sequence. tokens [B] int64, pos int64 [1] (the position written, on the device).
        Returns logits [B, V] fp32. No host syncs: capturable in a CUDA graph.

        mode: "dense", "hash", or two ablations used by the benchmark's time breakdown: "none" (no
        attention at all: weights and overhead) and "hash-fixed" (sparse attention over ``fixed_index``,
        the (idx, counts) pair :meth:`select` returns: no signing, scoring or selection).
        """
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        c = self.c
        x = self.embed(tokens)  # [B, H]
        cos = self.cos.index_select(0, pos).to(x.dtype)  # [1, D]
        sin = self.sin.index_select(0, pos).to(x.dtype)
        length = pos + 1  # [1] keys visible after writing this token
        fast = kernels.use_triton(x) and kernels.head_dim_ok(c.head_dim)  # fused norm / rotary / silu-mul
        fused_maps = mode == "hash" and fast and self._triton_maps_ok()  # one kernel signs q and k heads
        rows = self._select_rows(length, x.shape[0]) if mode == "hash" else None  # shared by all layers
        eps = c.rms_norm_eps
        h = kernels.rms_norm(x, self.layers[0].attention_norm, eps) if fast else None
        hk = self.host_kv
        ring = hk.ring_slot(pos) if hk is not None else None  # the new token's place in the working sets
        for li, blk in enumerate(self.layers):
            hi = hk.index[li] if hk is not None else -1
            kc, vc = (hk.k_host[hi], hk.v_host[hi]) if hi >= 0 else (self.k_cache[li], self.v_cache[li])
            if fast:  # on a host layer the rotary kernel writes the new K/V row into pinned memory (zero-copy)
                qkv = blk.attention.wqkv(h)
                qk = kernels.rope_and_cache(qkv, cos, sin, kc, vc, pos, c.num_heads, c.num_kv_heads)  # [B, Hq + Hkv, D]
                q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
                v = qkv[:, (c.num_heads + c.num_kv_heads) * c.head_dim:].view(-1, c.num_kv_heads, c.head_dim)
                if hi >= 0:
                    hk.write_token(hi, k, v, pos, ring, to_host=False)
            else:
                q4, k4, v4 = self._qkv(blk, x[:, None], cos, sin)  # [B, H*, 1, D]
                if hi >= 0:
                    hk.write_token(hi, k4[:, :, 0], v4[:, :, 0], pos, ring, to_host=True)
                else:
                    kc.index_copy_(2, pos, k4)
                    vc.index_copy_(2, pos, v4)
                q, k, v = q4[:, :, 0], k4[:, :, 0], v4[:, :, 0]
            if mode == "dense":
                if kc.device != q.device and not kernels.use_triton(q):  # reference path: a full copy
                    kc, vc = kc.to(q.device), vc.to(q.device)
                o = kernels.decode_attention(q, kc, vc, length=length)
            elif mode == "none":
                o = q
            elif mode == "hash":  # sign, then kernel 1 (score + select) and kernel 2 (sparse attention)
                if fused_maps:
                    mc = self.maps.config
                    x_maps = qk if mc.key_heads == c.num_kv_heads else \
                        torch.cat([q, k.repeat_interleave(mc.key_heads // c.num_kv_heads, 1)], 1)
                    ws, bs = self._fused_maps
                    q_sig = kernels.fused_signatures(x_maps, ws, bs, li, c.num_heads, self.sig_cache[li], pos)
                else:
                    q_sig, k_sig = self._signatures(li, q[:, :, None], k[:, :, None], v[:, :, None])
                    self.sig_cache[li].index_copy_(2, pos, k_sig)
                    q_sig = q_sig[:, :, 0]
                if self._q_drift is not None:
                    q_sig = self._drifted_q_sig(li)
                sel = self.select(q_sig, self.sig_cache[li], length, rows)
                o = self._attend_selected(q, kc, vc, sel, hi, length)
            else:  # "hash-fixed": sparse attention over a fixed selection, no signing or selection
                o = self._attend_selected(q, kc, vc, fixed_index, hi, length)
            if fast:
                a = blk.attention.wo(o.reshape(o.shape[0], -1))
                x, h = kernels.rms_norm(a, blk.ffn_norm, eps, residual=x)
                m = blk.mlp.w2(kernels.silu_mul(blk.mlp.w13(h)))
                nxt = self.layers[li + 1].attention_norm if li + 1 < len(self.layers) else self.norm
                x, h = kernels.rms_norm(m, nxt, eps, residual=x)
            else:
                x = self._finish(blk, x[:, None], o[:, :, None])[:, 0]
        if fast:
            return self.lm_head(h).float()
        return self.logits(x)

    def set_query_drift(self, frac: float | None, generator: torch.Generator | None = None):
        """Benchmarks on synthetic caches only: hash mode's query signatures replaced by a random walk, each step
        flipping a fraction ``frac`` of the bits of the step before (per layer and query head; the first from
        random words). A model of decode's temporal locality (the query of the next token is much like this
        one's), so that a heavy-row cache sees hits. None or 0: the model's own signatures. Needs the caches."""
        if not frac:
            self._q_drift = None
            return
        b, w = self.sig_cache.shape[1], self.sig_cache.shape[-1]
        prev = torch.empty(self.c.num_layers, b, self.c.num_heads, w, dtype=torch.int32, device=self.device)
        prev.random_(-2 ** 31, 2 ** 31 - 1, generator=generator)
        self._q_drift = (float(frac), prev)

    def _drifted_q_sig(self, li: int) -> torch.Tensor:
        """int32 [B, Hq, W]: layer ``li``'s drifting query signatures one step on (:meth:`set_query_drift`)."""
        frac, prev = self._q_drift
        flip = torch.rand(*prev.shape[1:], 32, device=prev.device) < frac  # [B, Hq, W, 32]: bits to flip
        mask = (flip.long() << torch.arange(32, device=prev.device)).sum(-1)
        prev[li] ^= torch.where(mask >= 2 ** 31, mask - 2 ** 32, mask).to(torch.int32)  # as signed words
        return prev[li]

    @staticmethod
    def _select_rows(length: torch.Tensor, b: int) -> tuple:
        """(starts, lengths) int64 [b] of every sequence's valid keys; made once per step, not per layer."""
        return torch.zeros(b, dtype=torch.int64, device=length.device), length.expand(b).contiguous()

    def select(self, q_sig: torch.Tensor, sig_cache: torch.Tensor, length: torch.Tensor, rows=None):
        """Token indices each KV head reads at this step: (idx int32 [B, Hkv, K] ascending, -1 after
        counts[b]; counts int32 [B]), by :func:`hashattention.kernels.score_select` (Triton on CUDA).

        q_sig int32 [B, Hq, W]; sig_cache int32 [B, Hsig, S, W]; length int64 [1] (tokens in the cache);
        rows: :meth:`_select_rows` of ``length`` when the caller has it. K = budget.total(S) (static). Same set
        as core.selection.select with bit-match scores combined over each KV group by ``self.selection``
        (HashAttentionPolicy with that selection), the heavy budget taken at ``length``.
        """
        starts, lengths = rows if rows is not None else self._select_rows(length, q_sig.shape[0])
        if kernels.use_triton(q_sig):
            return score_select(q_sig, sig_cache, starts, lengths, self.budget, self.c.num_kv_heads,
                                selection=self.selection)
        return score_select_reference(q_sig, sig_cache, starts, lengths, self.budget, self.c.num_kv_heads, True,
                                      self.selection)

    def _attend_selected(self, q, kc, vc, sel, hi: int, length):
        """Sparse attention over the selection ``sel`` = (idx [B, Hkv, K], counts [B]); on a host layer over its
        GPU working set, after fetching the heavy rows it lacks from host memory."""
        idx, counts = sel
        if hi < 0:
            return _sparse_attention(q, kc, vc, idx, counts)
        hk = self.host_kv
        if hk.direct:  # every selected row straight from pinned memory (zero-copy): all of them cross PCIe
            hk.stats[0] += (idx >= 0).sum()
            return _sparse_attention(q, kc, vc, idx, counts)
        return _sparse_attention(q, hk.ws_k[hi], hk.ws_v[hi], hk.fetch(hi, idx, length), counts)

    def index_slots(self) -> int:
        return self.budget.sink + self.budget.window + self.heavy_slots


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 / 100 else f"{n / 2 ** 20:.2f} MiB"


def _sparse_attention(q, k_cache, v_cache, idx, counts):
    """Kernel 2 (Triton) where it applies (CUDA or the interpreter, bf16/fp16, power-of-two head_dim), else
    its PyTorch reference. q [B, Hq, D]; idx int32 [B, Hkv, K]; counts int32 [B]."""
    if kernels.use_triton(q) and q.dtype in SPARSE_DTYPES and kernels.head_dim_ok(q.shape[-1]) \
            and q.shape[-1] <= 256:
        return sparse_decode(q.contiguous(), k_cache, v_cache, idx, counts, check=False)
    return sparse_decode_reference(q, k_cache, v_cache, idx, counts)
