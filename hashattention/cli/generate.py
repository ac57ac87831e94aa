"""`hashattention generate`: text from a prompt under any policy, budget and mode, streamed to stdout as it comes.

    hashattention generate --prompt "The capital of France is" --max-new-tokens 32
    echo "Write a haiku about hashing." | hashattention generate --chat --temperature 0.8 --top-p 0.9 --seed 1
    hashattention generate --prompt-file long.txt --policy quest --budget 1/32 --mode everywhere

Two paths, and the command says which one it took (on stderr, with the statistics, so stdout holds only text):

  engine   on CUDA, for the model families the engine supports (:data:`hashattention.engine.model.
           SUPPORTED_MODEL_TYPES`) with policy dense, hash or simhash, one selection per KV group, mode
           decode: static caches, one CUDA graph per step, the library's Triton kernels; sampling on the device
           (:class:`hashattention.engine.Generator`). ``--engine on`` forces it (on a CPU it runs the step's
           PyTorch references: slow, for checks), ``--engine off`` never takes it.
  hf       everything else: transformers' ``generate`` with the policy enabled (``ha.enable``).

Bad input (an empty prompt, an unknown policy, mode or model family, a prompt that does not fit the model's
window or the planned cache, ``--chat`` without a chat template) is refused before the model loads, as far as it
can be known then (the tokenizer and the config are read first).
"""
from __future__ import annotations

import json
import os
import sys
import time

#: policies the engine runs (every other policy takes the Hugging Face path)
ENGINE_POLICIES = ("dense", "hash", "simhash")


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a prompt under a policy, streamed (the fast engine on "
                                        "a GPU)")
    p.add_argument("text", nargs="?", default=None, help="the prompt (or --prompt, --prompt-file, or stdin)")
    p.add_argument("--prompt", default=None, help="the prompt")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file ('-': stdin)")
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a folder, a "
                                                      ".gguf file or a hub id")
    p.add_argument("--policy", default="hash", help="dense, hash, simhash, oracle, quest, h2o, sink_window, random, "
                                                    "bucket-*")
    p.add_argument("--budget", default="1/16", help="heavy tokens: a fraction of the context (1/16), a count (512) "
                                                    "or 'full'")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--mode", default="decode", help="decode: dense prefill, sparse decode; everywhere: every query "
                                                    "sparse (chunked prefill)")
    p.add_argument("--maps", default=None, help="maps file for 'hash' (default: the shipped maps, default model)")
    p.add_argument("--per-head", action="store_true", help="one selection per query head (default: per KV group)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); > 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to "
                                                           "this probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed gives the same text)")
    p.add_argument("--engine", choices=["auto", "on", "off"], default="auto",
                   help="auto: the engine on CUDA where it applies; on: always (a CPU runs it slowly); off: never")
    p.add_argument("--offload", choices=["", "host"], default="",
                   help="host: the engine keeps the K/V beyond the card's memory in pinned host memory (CUDA; "
                        "implies --engine on)")
    p.add_argument("--cache-len", type=int, default=None,
                   help="tokens the engine's static cache holds (default: prompt + new tokens)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the tokens, text and statistics to this JSON file")
    p.set_defaults(func=run)


# -- input -----------------------------------------------------------------------------------------------
def read_prompt(args, stdin=None) -> str:
    given = [x for x in (args.text, args.prompt, args.prompt_file) if x is not None]
    if len(given) > 1:
        raise ValueError("give the prompt once: as an argument, --prompt or --prompt-file")
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            text = (stdin or sys.stdin).read()
        else:
            if not os.path.isfile(args.prompt_file):
                raise FileNotFoundError(f"prompt file {args.prompt_file} does not exist")
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
    elif given:
        text = given[0]
    else:
        stdin = stdin or sys.stdin
        if stdin is None or stdin.isatty():
            raise ValueError("no prompt: give one as an argument, with --prompt or --prompt-file, or on stdin")
        text = stdin.read()
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def parse_budget(args):
    from ..core.budget import Budget
    heavy = 1.0 if str(args.budget).strip().lower() == "full" else args.budget
    return Budget(heavy=heavy, sink=args.sink, window=args.window)


def peek_model_type(name: str) -> str | None:
    """The model family, read without loading anything heavy where that is possible (else None)."""
    from ..models import DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return "llama"  # SmolLM2-135M-Instruct
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if path.endswith(".json") and os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable model config: {e}") from None
        return cfg.get("model_type") if isinstance(cfg, dict) else None
    return None


def check_options(args) -> None:
    """Everything that can be refused from the arguments alone."""
    from ..engine.generate import check_sampling
    from ..integration.hf import MODES, SUPPORTED_MODEL_TYPES, UnsupportedModelError
    from ..models import DEFAULT_MODEL
    from ..policies import POLICIES
    if args.policy not in POLICIES:
        raise ValueError(f"unknown policy {args.policy!r}; available: {', '.join(POLICIES)}")
    if args.mode not in MODES:
        raise ValueError(f"unknown mode {args.mode!r}; available: {', '.join(MODES)}")
    parse_budget(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_p)
    if args.cache_len is not None and args.cache_len < 2:
        raise ValueError(f"--cache-len must be >= 2, got {args.cache_len}")
    mt = peek_model_type(args.model)
    if mt is not None and mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {mt!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if args.maps is not None and not os.path.exists(args.maps) and not os.path.exists(args.maps + ".safetensors"):
        raise FileNotFoundError(f"maps file {args.maps} does not exist")
    if args.policy == "hash" and args.maps is None and args.model != DEFAULT_MODEL:
        raise ValueError("policy 'hash' needs --maps for this model (maps are shipped for the default model only; "
                         "train them with `hashattention train`)")
    reason = engine_reason(args, mt)
    if args.engine == "on" and reason:
        raise ValueError(f"--engine on: {reason}")


def _engine_fits(config, cache_len: int) -> str | None:
    """Why the engine cannot hold this model and cache (None: it can), known once the config is loaded."""
    from ..engine.model import EngineConfig, UnsupportedModelError
    try:
        c = EngineConfig.from_hf(config)
    except UnsupportedModelError as e:
        return str(e)
    if c.sliding_window is not None and cache_len > c.sliding_window:
        return f"a sliding window of {c.sliding_window} tokens, shorter than the cache ({cache_len})"
    return None


def engine_reason(args, model_type: str | None) -> str | None:
    """Why the engine cannot run this request (None: it can)."""
    from ..engine.model import SUPPORTED_MODEL_TYPES
    if args.policy not in ENGINE_POLICIES:
        return f"policy {args.policy} is not in the engine ({', '.join(ENGINE_POLICIES)})"
    if args.mode != "decode":
        return f"mode {args.mode}: the engine prefills densely (mode decode)"
    if args.per_head:
        return "--per-head: the engine selects per KV group"
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type} is not in the engine ({', '.join(SUPPORTED_MODEL_TYPES)})"
    return None


# -- loading (module functions, so tests can hand in a loaded model) --------------------------------------
def _source(name: str):
    from ..models import DEFAULT_MODEL, default_gguf_path
    if name == DEFAULT_MODEL or str(name).endswith(".gguf"):
        path = default_gguf_path() if name == DEFAULT_MODEL else name
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    return name, {}


def load_tokenizer(name: str):
    """(tokenizer, config) of a model, without its weights."""
    from transformers import AutoConfig, AutoTokenizer
    src, kw = _source(name)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, AutoConfig.from_pretrained(src, **kw)


def load_model(name: str, device):
    from ..models import load_model as _load
    model, _, model_id = _load(name, device=device)
    return model, model_id


# -- output --------------------------------------------------------------------------------------------------
class TextStream:
    """Prints the new text as tokens arrive (both paths). Also a transformers streamer (put / end): the first
    put is the prompt, which is skipped."""

    def __init__(self, tok, out=None, skip_first_put: bool = True):
        self.tok, self.out = tok, out or sys.stdout
        self.ids: list[int] = []
        self.times: list[float] = []
        self._printed = 0
        self._skip = skip_first_put
        self._ended = False

    def add(self, token_id: int):
        self.ids.append(int(token_id))
        self.times.append(time.perf_counter())
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for its last byte
            return
        self.out.write(text[self._printed:])
        self.out.flush()
        self._printed = len(text)

    def put(self, value):
        if self._skip:
            self._skip = False
            return
        for v in value.reshape(-1).tolist():
            self.add(v)

    def end(self):
        """The rest of the text, and a newline unless it ends with one (once: transformers calls it too)."""
        if self._ended:
            return
        self._ended = True
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self._printed:] + ("" if text.endswith("\n") else "\n"))
        self.out.flush()
        self._printed = len(text)

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)


def _eos_ids(model_or_config, tok) -> list[int]:
    gc = getattr(model_or_config, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = tok.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _peak_memory(dev) -> tuple[str, int]:
    import torch
    if dev.type == "cuda":
        return "GPU peak allocated", int(torch.cuda.max_memory_allocated(dev))
    try:
        import resource
        return "process peak RSS", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return "process peak RSS", 0


# -- the command -----------------------------------------------------------------------------------------
def run(args) -> int:
    prompt = read_prompt(args)
    check_options(args)
    budget = parse_budget(args)
    err = sys.stderr
    if getattr(args, "offload", ""):  # refused before anything loads
        from ..models import pick_device
        if args.engine == "off":
            raise ValueError("--offload host runs in the engine: drop --engine off")
        if pick_device(args.device).type != "cuda":
            raise ValueError("--offload host keeps the K/V in pinned host memory read by the GPU: it needs CUDA")
    tok, cfg = load_tokenizer(args.model)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template; leave --chat out")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    t, n = ids.shape[1], args.max_new_tokens
    if t < 1:
        raise ValueError("the prompt has no tokens")
    window = getattr(cfg, "max_position_embeddings", None)
    if window and t >= window:
        raise ValueError(f"the prompt ({t} tokens) is longer than the model's window ({window} tokens): shorten it")
    if window and t + n > window:
        raise ValueError(f"the prompt ({t} tokens) + {n} new tokens exceed the model's {window}-token window: "
                         f"use --max-new-tokens {window - t} or less")
    cache_len = args.cache_len or t + n
    if t + n > cache_len:
        raise ValueError(f"the prompt ({t} tokens) + {n} new tokens do not fit the planned cache of {cache_len} "
                         "tokens (--cache-len)")
    if isinstance(budget.heavy, int):
        budget.check_fits(t)
    model_type = getattr(cfg, "model_type", None)
    from ..integration.hf import SUPPORTED_MODEL_TYPES, UnsupportedModelError
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    from ..models import pick_device
    dev = pick_device(args.device)
    reason = engine_reason(args, model_type)
    if args.offload:
        args.engine = "on"
    if args.engine == "on" and reason:
        raise ValueError(f"--engine on: {reason}")
    use_engine = args.engine == "on" or (args.engine == "auto" and dev.type == "cuda" and reason is None)
    if args.engine == "auto" and reason is None and dev.type != "cuda":
        reason = "no CUDA device (the engine's CUDA graphs and kernels need one)"
    elif args.engine == "off":
        reason = "--engine off"

    import torch
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_load = time.perf_counter()
    model, model_id = load_model(args.model, dev)
    policy = _make_policy(args, budget, model)
    load_s = time.perf_counter() - t_load
    stream = TextStream(tok)
    eos = _eos_ids(model, tok)
    if use_engine:
        fit = None if args.offload else _engine_fits(model.config, cache_len)  # offload: setup_caches checks
        if fit and args.engine == "on":
            raise ValueError(f"--engine on: {fit}")
        if fit:
            use_engine, reason = False, fit
    picking = "greedy" if args.temperature == 0 else \
        f"sampling T={args.temperature} top-p={args.top_p} seed={args.seed}"
    head = f"{model_id} on {dev} ({load_s:.0f} s to load); policy {args.policy}, budget {budget.describe()}, " \
           f"mode {args.mode}; prompt {t} tokens{' (chat template)' if args.chat else ''}; {picking}"
    if use_engine:
        from ..engine import Transformer
        path = "engine (static caches, CUDA graphs, Triton kernels)" if dev.type == "cuda" else \
            "engine (PyTorch reference step: no CUDA)"
        print(f"{head}\npath: {path}", file=err, flush=True)
        dtype = next(model.parameters()).dtype
        engine = Transformer.from_hf(model)
        del model  # the engine holds its own copy of the weights
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        res = _run_engine(engine, policy, ids, n, budget, cache_len, args, stream, eos, dev)
    else:
        path = f"hf (transformers generate under ha.enable; engine not used: {reason})"
        print(f"{head}\npath: {path}", file=err, flush=True)
        dtype = next(model.parameters()).dtype
        res = _run_hf(model, policy, ids, n, args, stream, eos, tok, dev)
    stream.end()
    new = len(stream.ids)
    from ..engine.memory import memory_report
    mem = memory_report(cfg, t + new, 1, dtype=dtype)
    kv, sig = mem["kv_bytes"], mem["signature_bytes"] if args.policy in ("hash", "simhash") else 0
    peak_what, peak = _peak_memory(dev)
    prefill_s = stream.times[0] - res["t0"] if stream.times else 0.0
    decode_s = stream.times[-1] - stream.times[0] if len(stream.times) > 1 else 0.0
    tps = (new - 1) / decode_s if decode_s > 0 else float("nan")
    read, ctx = res["tokens_read"], res["context"]
    print(f"-- {new} new tokens: {tps:.1f} tokens/s decoding (prefill of {t} tokens + first token {prefill_s:.2f} s)"
          f"; tokens read per step {read:.0f} of {ctx:.0f} ({read / max(ctx, 1):.1%}"
          f"{'' if args.mode == 'decode' else ', every query: the prompt too'}); memory: KV cache "
          f"{_fmt_bytes(kv)}" + (f" + signatures {_fmt_bytes(sig)}" if sig else "") +
          f", {peak_what} {_fmt_bytes(peak)}; path {path.split(' ')[0]}", file=err, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_id, "device": str(dev), "path": path.split(" ")[0], "policy": args.policy,
                       "budget": budget.describe(), "mode": args.mode, "prompt_tokens": t, "tokens": stream.ids,
                       "text": stream.text, "tokens_per_s": tps, "prefill_s": prefill_s,
                       "tokens_read_per_step": read, "context_per_step": ctx, "kv_cache_bytes": kv,
                       "signature_bytes": sig, "peak_memory_bytes": peak, "peak_memory": peak_what,
                       "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}, f, indent=1)
    return 0


def _make_policy(args, budget, model):
    from ..policies import make_policy
    maps = None
    if args.policy == "hash":
        dev = next(model.parameters()).device
        if args.maps:
            from ..weights import load_maps
            maps = load_maps(args.maps, model.config, device=dev)
        else:
            from ..shipped import load_default_maps
            maps = load_default_maps(model)
    return make_policy(args.policy, budget, maps=maps, model_config=model.config, per_group=not args.per_head)


def _run_hf(model, policy, ids, n, args, stream, eos, tok, dev) -> dict:
    import torch

    from ..integration.hf import enable
    ids = ids.to(dev)
    kw = dict(max_new_tokens=n, pad_token_id=tok.pad_token_id, eos_token_id=eos or None, streamer=stream,
              attention_mask=torch.ones_like(ids), do_sample=args.temperature > 0)
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=0)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.policy == "dense":  # the model's own attention reads everything
            model.generate(ids, **kw)
            read = ctx = None
        else:
            with enable(model, policy, mode=args.mode) as handle:
                model.generate(ids, **kw)
                st = handle.stats()
            read, ctx = st["tokens_read"], st["context"]
    if read is None:
        t, m = ids.shape[1], len(stream.ids)
        read = ctx = (sum(range(t + 1, t + m)) / (m - 1)) if m > 1 else t
    return {"t0": t0, "tokens_read": read, "context": ctx}


def _run_engine(em, policy, ids, n, budget, cache_len, args, stream, eos, dev) -> dict:
    from ..engine import Generator
    mode = "dense" if args.policy == "dense" else "hash"
    maps = getattr(policy, "maps", None) if mode == "hash" else None
    off = {"offload": "host", "dense_baseline": mode == "dense"} if getattr(args, "offload", "") else {}
    em.setup_caches(1, cache_len, maps=maps, budget=budget, **off)
    gen = Generator(em, max_new_tokens=n, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    gen.capture(mode)  # compile the kernels and record the step before the clock starts (no-op without CUDA)
    t0 = time.perf_counter()
    gen.stream(ids.to(dev), n, mode=mode, on_token=lambda toks: stream.add(toks[0]), stop_tokens=eos)
    t, m = ids.shape[1], len(stream.ids)
    lengths = range(t + 1, t + m)  # keys visible at each decode step
    ctx = sum(lengths) / (m - 1) if m > 1 else t
    read = (sum(budget.total(L) for L in lengths) / (m - 1) if m > 1 else budget.total(t)) if mode == "hash" else ctx
    return {"t0": t0, "tokens_read": read, "context": ctx}
