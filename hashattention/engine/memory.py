"""How much memory a model's KV cache and HashAttention's signatures take, before anything runs.

Per cached token (all layers):
    KV bytes         = 2 (K and V) * layers * kv_heads * head_dim * bytes per value
    signature bytes  = layers * key_heads * bits / 8        (key_heads = kv_heads by default: 32 bits per
                                                            token per KV head; num_q_heads for maps in the
                                                            authors' per-query-head layout)
Llama-3.1-8B in bf16: 131,072 KV bytes and 1,024 signature bytes per token (ratio 1/128).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .config import PRESET_ALIASES, PRESETS, CacheError, EngineConfig, preset_names

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "fp8": 1,
               "float8": 1, "int8": 1}
GIB = 1024 ** 3
#: kept free when sizing a batch: CUDA context of other libraries, cuBLAS workspace, graph pools
RESERVE_BYTES = int(1.5 * GIB)


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def parse_tokens(text) -> int:
    """'128K' -> 131072, '16k' -> 16384, '1M' -> 1048576, '5000' -> 5000."""
    if isinstance(text, int):
        v = text
    else:
        t = str(text).strip().upper()
        mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
        try:
            v = int(float(t[:-1] if mult > 1 else t) * mult)
        except ValueError:
            raise ValueError(f"cannot read a token count from {text!r} (examples: 4096, 16K, 128K)") from None
    if v < 1:
        raise ValueError(f"a token count must be positive, got {text!r}")
    return v


def parse_bytes(text) -> int:
    """'80GiB' / '80G' / '80GB' -> bytes (GiB and GB both taken as 2^30, as GPU memory is quoted)."""
    t = str(text).strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (example: 80GiB)") from None


@dataclass
class Shape:
    """What the report needs from a model config."""
    name: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False

    @classmethod
    def from_config(cls, cfg, name: str = "") -> "Shape":
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        needed = ["num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"]
        missing = [k for k in needed if get(k) is None]
        if missing:
            raise ValueError(f"model config {name or ''} lacks {', '.join(missing)}: not a decoder config")
        hq = get("num_attention_heads")
        inter = get("intermediate_size") or 4 * get("hidden_size")
        return cls(name=name or get("_name_or_path", "") or "", model_type=get("model_type", "") or "",
                   num_layers=get("num_hidden_layers"), num_heads=hq,
                   num_kv_heads=get("num_key_value_heads") or hq,
                   head_dim=get("head_dim") or get("hidden_size") // hq, hidden_size=get("hidden_size"),
                   intermediate_size=inter, vocab_size=get("vocab_size"),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   attention_bias=bool(get("attention_bias", False) or get("model_type") == "qwen2"))

    def params(self) -> int:
        """Parameter count of a Llama-style decoder with this shape."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d + 2 * h * self.num_kv_heads * d + self.num_heads * d * h
        if self.attention_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * d
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h
        return self.num_layers * layer + emb * (1 if self.tie_word_embeddings else 2) + h


def resolve_shape(spec: str) -> Shape:
    """``spec``: "default", a preset name (llama-3.1-8b, ...), a local folder with config.json, or a
    config.json path. Nothing is downloaded."""
    key = PRESET_ALIASES.get(str(spec).lower(), str(spec).lower())
    if key in PRESETS:
        return Shape.from_config(PRESETS[key], name=key)
    path = spec
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable JSON config: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} does not hold a config object")
        cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
        return Shape.from_config(cfg, name=str(spec))
    raise FileNotFoundError(f"{spec!r} is neither a preset ({', '.join(preset_names())}), nor a folder with a "
                            "config.json, nor a config.json file")


def _shape(c) -> Shape:
    if isinstance(c, Shape):
        return c
    if isinstance(c, EngineConfig):
        return Shape(name=c.model_type, model_type=c.model_type, num_layers=c.num_layers, num_heads=c.num_heads,
                     num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_size=c.hidden_size,
                     intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                     tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias)
    return Shape.from_config(c)


def kv_bytes_per_token(c, dtype="bfloat16") -> int:
    s = _shape(c)
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * dtype_bytes(dtype)


def signature_bytes_per_token(c, bits: int = 32, key_heads: int | None = None) -> int:
    s = _shape(c)
    if bits % 32:
        raise ValueError(f"bits must be a multiple of 32, got {bits}")
    return s.num_layers * (key_heads or s.num_kv_heads) * bits // 8


def maps_params(c, bits: int = 32, hidden: int = 128, depth: int = 3, key_heads: int | None = None) -> int:
    s = _shape(c)
    dims = [s.head_dim] + [hidden] * (depth - 1) + [bits]
    per_head = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    return s.num_layers * (s.num_heads + (key_heads or s.num_kv_heads)) * per_head


def cache_bytes(c, batch: int, seq: int, dtype="bfloat16", maps_config=None) -> int:
    """Bytes the engine allocates for its caches (KV, signatures, rotary tables) plus the decode step's
    largest per-sequence temporaries (selection keys, logits)."""
    s = _shape(c)
    n = kv_bytes_per_token(s, dtype) * batch * seq
    if maps_config is not None:
        n += signature_bytes_per_token(s, maps_config.bits, maps_config.key_heads) * batch * seq
        n += batch * s.num_kv_heads * seq * 8 * 2  # topk keys and their values/indices
    n += 2 * seq * s.head_dim * 4  # cos, sin
    n += batch * s.vocab_size * 4 * 3  # logits (fp32) and argmax temporaries
    return n


def check_fits(need: int, device, what: str = "this request", reserve: int = RESERVE_BYTES,
               free: int | None = None):
    """Raise a clear error *before* allocating when ``need`` bytes do not fit the free GPU memory
    (``free`` given: that many bytes, on any device)."""
    if free is None:
        if torch.device(device).type != "cuda":
            return
        free, total = torch.cuda.mem_get_info(device)
        # blocks PyTorch has cached but not handed out are free for our allocation too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        where = f"of {total / GIB:.1f} GiB are free on {torch.cuda.get_device_name(device)}"
    else:
        where = "are free"
    if need + reserve > free:
        raise CacheError(f"{what} needs {need / GIB:.2f} GiB but only {free / GIB:.2f} GiB {where} "
                         f"(keeping {reserve / GIB:.1f} GiB spare): use a smaller batch or context")


def largest_batch(c, seq: int, free_bytes: int, dtype="bfloat16", maps_config=None,
                  reserve: int = RESERVE_BYTES, limit: int = 256) -> int:
    """The largest batch whose caches fit in ``free_bytes`` (0 if not even one sequence fits)."""
    best = 0
    for b in range(1, limit + 1):
        if cache_bytes(c, b, seq, dtype, maps_config) + reserve > free_bytes:
            break
        best = b
    return best


#: host memory left to the OS and the process when sizing K/V in host memory
HOST_RESERVE_BYTES = 8 * GIB


def offload_plan(c, batch: int, seq: int, gpu_free: int, host_free: int, dtype="bfloat16", maps_config=None,
                 sink: int = 128, window: int = 128, row_cache: int = 0, reserve: int = RESERVE_BYTES,
                 host_reserve: int = HOST_RESERVE_BYTES, weights: int = 0) -> dict:
    """Tiered placement of ``batch`` x ``seq`` (engine ``offload="host"``): the most layers whose K/V fit on
    the GPU beside ``weights`` and everything else the step needs, the others in host memory. Returns
    {gpu_layers, gpu_bytes, host_bytes, fits}; ``row_cache``: heavy-row slots per KV head (0 = dense baseline,
    no working sets)."""
    from .offload import offload_bytes
    s = _shape(c)
    fixed = cache_bytes(s, batch, seq, dtype, maps_config) - kv_bytes_per_token(s, dtype) * batch * seq + weights
    args = (s.num_layers, batch, seq, s.num_kv_heads, s.head_dim, dtype_bytes(dtype), sink, window,
            max(row_cache, 1), row_cache > 0)
    g = 0
    while g < s.num_layers and fixed + offload_bytes(args[0], g + 1, *args[1:])[0] + reserve <= gpu_free:
        g += 1
    gpu, host = offload_bytes(args[0], g, *args[1:])
    fits = fixed + gpu + reserve <= gpu_free and host + host_reserve <= host_free
    return {"gpu_layers": g, "gpu_bytes": fixed + gpu, "host_bytes": host, "fits": fits}


def largest_offload_batch(c, seq: int, gpu_free: int, host_free: int, limit: int = 256, **kw) -> int:
    """The largest batch :func:`offload_plan` fits in card plus host memory (0 if none)."""
    best = 0
    for b in range(1, limit + 1):
        if not offload_plan(c, b, seq, gpu_free, host_free, **kw)["fits"]:
            break
        best = b
    return best


def memory_report(spec, context: int, batch: int = 1, dtype="bfloat16", bits: int = 32,
                  key_heads: str = "kv", gpu_memory: int | None = None, host_memory: int | None = None,
                  heavy=1 / 32, sink: int = 128, window: int = 128, row_cache: float = 2.0) -> dict:
    """KV bytes, signature bytes and their ratio for ``batch`` sequences of ``context`` tokens.

    spec: a model spec for :func:`resolve_shape` or a config. key_heads: "kv" (default maps) or "q"
    (authors' layout). gpu_memory: bytes of one GPU, to say how many sequences fit next to the weights.
    host_memory (with gpu_memory): bytes of host memory, to say whether dense, HashAttention on the GPU and
    HashAttention with the K/V tiered over card and host (offload; ``heavy``, ``sink``, ``window`` the budget,
    ``row_cache`` the heavy-row cache in multiples of the heavy budget) fit, with the numbers.
    """
    s = spec if isinstance(spec, Shape) else (resolve_shape(spec) if isinstance(spec, str) else _shape(spec))
    context, batch = parse_tokens(context), parse_tokens(batch)
    if key_heads not in ("kv", "q"):
        raise ValueError(f"key_heads must be 'kv' or 'q', got {key_heads!r}")
    kh = s.num_kv_heads if key_heads == "kv" else s.num_heads
    kv_tok = kv_bytes_per_token(s, dtype)
    sig_tok = signature_bytes_per_token(s, bits, kh)
    tokens = context * batch
    weights = s.params() * dtype_bytes(dtype)
    rep = {
        "model": s.name, "model_type": s.model_type, "layers": s.num_layers, "q_heads": s.num_heads,
        "kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "dtype": str(dtype), "bits": bits,
        "signature_heads": kh, "context": context, "batch": batch,
        "kv_bytes_per_token": kv_tok, "signature_bytes_per_token": sig_tok,
        "kv_bytes": kv_tok * tokens, "signature_bytes": sig_tok * tokens,
        "signature_to_kv_ratio": sig_tok / kv_tok,
        "weights_bytes": weights, "params": s.params(),
        "maps_bytes": maps_params(s, bits, key_heads=kh) * 4,
    }
    if gpu_memory:
        per_seq = (kv_tok + sig_tok) * context
        room = gpu_memory - weights - RESERVE_BYTES
        rep["gpu_memory"] = gpu_memory
        rep["max_batch_dense"] = max(0, room // (kv_tok * context))
        rep["max_batch_hash"] = max(0, room // per_seq)
        rep["fits"] = room >= per_seq * batch
        if host_memory:
            from ..core.budget import Budget
            from ..core.maps import MapsConfig
            mc = MapsConfig(num_layers=s.num_layers, num_q_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                            head_dim=s.head_dim, bits=bits, key_heads=kh)
            slots = max(1, int(round(row_cache * Budget(heavy=heavy, sink=sink, window=window).heavy_count(context))))
            kw = dict(dtype=dtype, weights=weights, sink=sink, window=window)
            dense = cache_bytes(s, batch, context, dtype) + weights
            hash_gpu = cache_bytes(s, batch, context, dtype, mc) + weights
            off = offload_plan(s, batch, context, gpu_memory, host_memory, maps_config=mc, row_cache=slots, **kw)
            rep["host_memory"] = host_memory
            rep["placements"] = {
                "dense": {"gpu_bytes": dense, "host_bytes": 0, "fits": dense + RESERVE_BYTES <= gpu_memory},
                "hash_gpu": {"gpu_bytes": hash_gpu, "host_bytes": 0, "fits": hash_gpu + RESERVE_BYTES <= gpu_memory},
                "hash_offload": dict(off, row_cache=slots, layers=s.num_layers),
            }
            rep["max_batch_offload"] = largest_offload_batch(s, context, gpu_memory, host_memory, maps_config=mc,
                                                             row_cache=slots, **kw)
    return rep


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} B"


def format_report(r: dict) -> str:
    lines = [
        f"model {r['model']} ({r['model_type'] or '?'}): {r['layers']} layers, {r['q_heads']} query heads, "
        f"{r['kv_heads']} KV heads, head_dim {r['head_dim']}, {r['dtype']}, {r['params'] / 1e9:.2f}B parameters "
        f"({_fmt(r['weights_bytes'])})",
        f"context {r['context']:,} tokens x batch {r['batch']}",
        f"  KV cache          {_fmt(r['kv_bytes']):>14}   ({r['kv_bytes_per_token']:,} bytes per token)",
        f"  signatures        {_fmt(r['signature_bytes']):>14}   ({r['signature_bytes_per_token']:,} bytes per "
        f"token: {r['bits']} bits x {r['signature_heads']} heads x {r['layers']} layers)",
        f"  signatures / KV   {r['signature_to_kv_ratio'] * 100:13.3f} %   (1/{1 / r['signature_to_kv_ratio']:.0f})",
        f"  maps (fp32)       {_fmt(r['maps_bytes']):>14}",
    ]
    if "gpu_memory" in r:
        lines.append(f"on a {_fmt(r['gpu_memory'])} GPU next to the weights: up to {r['max_batch_dense']} "
                     f"sequences dense, {r['max_batch_hash']} with signatures"
                     + ("" if r["fits"] else f" -- batch {r['batch']} does NOT fit"))
    if "placements" in r:
        p = r["placements"]
        lines.append(f"batch {r['batch']} on a {_fmt(r['gpu_memory'])} GPU with {_fmt(r['host_memory'])} of host "
                     "memory (GPU: weights, caches, step temporaries and 1.5 GiB spare; host: 8 GiB spare):")
        for key, label in (("dense", "dense, all on the GPU"), ("hash_gpu", "HashAttention on the GPU"),
                           ("hash_offload", "HashAttention, K/V offloaded")):
            q = p[key]
            extra = ""
            if key == "hash_offload":
                extra = (f"  ({q['gpu_layers']} of {q['layers']} layers' K/V on the GPU, the rest in host memory; "
                         f"{q['row_cache']} heavy-row slots per KV head; up to batch {r['max_batch_offload']})")
            lines.append(f"  {label:<30} {'fits' if q['fits'] else 'does NOT fit':<13} GPU {_fmt(q['gpu_bytes']):>12}"
                         f"  host {_fmt(q['host_bytes']):>12}{extra}")
    return "\n".join(lines)
