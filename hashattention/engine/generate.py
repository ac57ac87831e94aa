"""Generation with the engine: dense prefill, then one CUDA graph per attention mode for the decode step.

    from hashattention.engine import Transformer, Generator
    model = Transformer.from_hf(hf_model)                      # or Transformer.random(preset_config(...))
    model.setup_caches(batch=1, max_seq_len=4096, maps=maps, budget=Budget(heavy=1/32))
    gen = Generator(model)
    tokens = gen.generate(prompt_ids, max_new_tokens=64, mode="hash")   # [B, 64], greedy
    gen = Generator(model, temperature=0.8, top_p=0.9, seed=1)          # sampling, on the device
    tokens = gen.stream(prompt_ids, 64, mode="hash", on_token=print, stop_tokens=[eos])  # one call per token

The decode step reads its inputs from static device buffers (token, position, step) and advances them
itself (argmax or a sample, position + 1), so a run of N tokens is N graph replays and no host sync until the
end (:meth:`Generator.stream` reads each token back to hand it to its callback). Sampling draws its uniform
numbers for the whole run up front from a generator seeded with ``seed`` (on the device), and the captured
step picks its step's number: the same seed gives the same tokens, CUDA graphs or not.
"""
from __future__ import annotations

import torch

from .model import ATTENTION_MODES, CacheError, Transformer


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] from softmax(logits / temperature), restricted to the smallest set
    of most likely tokens whose probability reaches ``top_p`` (nucleus sampling), by inverting the CDF at the
    uniform numbers ``u`` [B] in [0, 1). No host sync, static shapes: capturable in a CUDA graph."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # the most likely token always stays
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)
    pick = pick.clamp_(max=logits.shape[-1] - 1)
    return (order.gather(-1, pick) if top_p < 1.0 else pick)[:, 0]


def check_sampling(temperature: float, top_p: float):
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class Generator:
    """Holds the static step buffers and the captured graphs of one model (one batch size, one cache).

    cuda_graphs: None = use them on CUDA. Graphs are captured lazily, one per mode, and share one memory
    pool; they stay valid until :meth:`Transformer.setup_caches` is called again (then make a new Generator).
    temperature 0 (the default) = greedy; > 0 samples (``top_p`` < 1: nucleus sampling) with uniform numbers
    drawn from a generator seeded with ``seed`` at the start of every generation.
    """

    def __init__(self, model: Transformer, cuda_graphs: bool | None = None, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if model.k_cache is None:
            raise CacheError("call model.setup_caches(...) before making a Generator")
        check_sampling(temperature, top_p)
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        self.model = model
        dev = model.device
        self.cuda_graphs = (dev.type == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and dev.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        b = model.batch
        n = max_new_tokens or model.max_seq_len
        self.tok = torch.zeros(b, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(b, n, dtype=torch.long, device=dev)
        self.uniform = torch.zeros(n, b, dtype=torch.float32, device=dev) if self.temperature > 0 else None
        self.fixed_index = None
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- one step ------------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The next token of every sequence: argmax, or a sample with this step's uniform numbers."""
        if self.uniform is None:
            return logits.argmax(-1)
        u = self.uniform.index_select(0, step.clamp(max=self.uniform.shape[0] - 1))[0]
        return sample_top_p(logits, self.temperature, self.top_p, u)

    def _step(self, mode: str):
        logits = self.model.decode_step(self.tok, self.pos, mode, fixed_index=self.fixed_index)
        nxt = self._pick(logits, self.step)
        self.out.index_copy_(1, self.step.clamp(max=self.out.shape[1] - 1), nxt[:, None])
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.step.add_(1)

    def _check_mode(self, mode: str):
        if mode not in ATTENTION_MODES:
            raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if mode in ("hash", "hash-fixed") and self.model.maps is None:
            raise ValueError(f"mode {mode!r} needs maps: setup_caches(..., maps=HashMaps)")
        if mode == "hash-fixed" and self.fixed_index is None:
            raise ValueError("mode 'hash-fixed' needs Generator.fixed_index ((idx, counts) from Transformer.select)")

    @torch.no_grad()
    def capture(self, mode: str):
        """Record the decode step of ``mode`` as a CUDA graph (the step buffers are restored after)."""
        self._check_mode(mode)
        if not self.cuda_graphs or mode in self.graphs:
            return
        saved = self._save()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the graph (lazy inits, Triton compilation)
            self._warmup(mode)
        torch.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            self._step(mode)
        self.graphs[mode] = g
        self._restore(saved)

    def _save(self) -> tuple:
        """What a step changes that the next real step still reads: the step buffers and, with K/V in host
        memory, the recent-window ring (a step ahead overwrites the slot of a token still in the window)."""
        hk = self.model.host_kv
        return (self.tok.clone(), self.pos.clone(), self.step.clone()), hk.snapshot() if hk is not None else None

    def _restore(self, saved: tuple):
        for buf, val in zip((self.tok, self.pos, self.step), saved[0]):
            buf.copy_(val)
        if saved[1] is not None:
            self.model.host_kv.restore(saved[1])

    def _warmup(self, mode: str, steps: int = 2):
        """``steps`` decode steps run ahead and taken back (buffers and state as before): compiles and warms up."""
        saved = self._save()
        for _ in range(steps):
            self._step(mode)
        self._restore(saved)

    @torch.no_grad()
    def run_steps(self, n: int, mode: str):
        """n decode steps from the current buffers (no host sync)."""
        self._check_mode(mode)
        if self.cuda_graphs:
            self.capture(mode)
            g = self.graphs[mode]
            for _ in range(n):
                g.replay()
        else:
            for _ in range(n):
                self._step(mode)

    def set_position(self, pos: int, token: int | torch.Tensor = 0):
        """Continue decoding at position ``pos`` (the caches hold pos tokens) with this input token. With the K/V in
        host memory, going back behind steps already run leaves the window ring holding their later tokens: fine
        for timing (:meth:`time_steps`), not for text; a new prompt (prefill) starts clean."""
        if not 0 <= pos < self.model.max_seq_len:
            raise CacheError(f"position {pos} is outside the cache of {self.model.max_seq_len} tokens")
        self.pos.fill_(pos)
        self.step.zero_()
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token)
        else:
            self.tok.fill_(token)

    # -- generation ----------------------------------------------------------------------------------
    def _start(self, input_ids: torch.Tensor, max_new_tokens: int, mode: str, prefill_chunk: int) -> torch.Tensor:
        """Checks, dense prefill, the first new token [B]; the step buffers are left at the first decode step."""
        m = self.model
        self._check_mode(mode)
        _, t = m.check_prompts(input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if t + max_new_tokens - 1 > m.max_seq_len:
            raise CacheError(f"prompt ({t}) + new tokens ({max_new_tokens}) need {t + max_new_tokens - 1} cache "
                             f"positions, the cache holds {m.max_seq_len}: call setup_caches with a larger max_seq_len")
        if max_new_tokens > self.out.shape[1]:
            raise ValueError(f"this Generator keeps at most {self.out.shape[1]} new tokens")
        if t > m.c.max_position_embeddings:
            import warnings
            warnings.warn(f"prompt of {t} tokens is longer than the model's {m.c.max_position_embeddings} "
                          "trained positions")
        if self.uniform is not None:  # the run's random numbers, from the seed: the same seed, the same tokens
            g = torch.Generator(device=self.uniform.device).manual_seed(self.seed)
            self.uniform.uniform_(generator=g)
        logits = m.prefill(input_ids, chunk=prefill_chunk)
        first = self._pick(logits, torch.zeros(1, dtype=torch.long, device=logits.device))
        self.out[:, 0] = first
        self.tok.copy_(first)
        self.pos.fill_(t)
        self.step.fill_(1)
        return first

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, mode: str = "dense",
                 prefill_chunk: int = 8192) -> torch.Tensor:
        """Continuation of equal-length prompts input_ids [B, T] (greedy unless the Generator samples): returns
        the new tokens [B, N]."""
        self._start(input_ids, max_new_tokens, mode, prefill_chunk)
        self.run_steps(max_new_tokens - 1, mode)
        return self.out[:, :max_new_tokens].clone()

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, mode: str = "dense", on_token=None,
               stop_tokens=(), prefill_chunk: int = 8192) -> torch.Tensor:
        """As :meth:`generate`, one step at a time: ``on_token(list of B token ids)`` after each new token, and
        an early stop once every sequence has produced one of ``stop_tokens`` (e.g. the EOS id; the stop token
        is kept). Returns the new tokens [B, n <= max_new_tokens]."""
        stop = {int(x) for x in stop_tokens}
        cur = self._start(input_ids, max_new_tokens, mode, prefill_chunk).tolist()
        done = [c in stop for c in cur]
        if on_token is not None:
            on_token(cur)
        n = 1
        while n < max_new_tokens and not all(done):
            self.run_steps(1, mode)
            cur = self.tok.tolist()  # one small device-to-host copy per token
            done = [d or c in stop for d, c in zip(done, cur)]
            n += 1
            if on_token is not None:
                on_token(cur)
        return self.out[:, :n].clone()

    @torch.no_grad()
    def time_steps(self, mode: str, pos: int, steps: int = 32, warmup: int = 4) -> float:
        """Mean milliseconds per decode step of ``mode`` over ``steps`` steps from position ``pos`` (CUDA
        events around graph replays; the caches must hold ``pos`` tokens)."""
        if pos + max(steps, warmup) > self.model.max_seq_len:
            raise CacheError(f"{max(steps, warmup)} steps from position {pos} overflow the cache of "
                             f"{self.model.max_seq_len} tokens")
        self.set_position(pos)
        self.run_steps(warmup, mode)
        if self.model.host_kv is not None:  # the offload counters of the timed steps only
            self.model.host_kv.stats.zero_()
        if self.model.device.type != "cuda":
            import time
            self.set_position(pos)
            t0 = time.perf_counter()
            self.run_steps(steps, mode)
            return (time.perf_counter() - t0) * 1e3 / steps
        self.set_position(pos)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.run_steps(steps, mode)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
