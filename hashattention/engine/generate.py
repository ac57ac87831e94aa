"""Greedy generation with the engine: dense prefill, then one CUDA graph per attention mode for the decode step.

    from hashattention.engine import Transformer, Generator
    model = Transformer.from_hf(hf_model)                      # or Transformer.random(preset_config(...))
    model.setup_caches(batch=1, max_seq_len=4096, maps=maps, budget=Budget(heavy=1/32))
    gen = Generator(model)
    tokens = gen.generate(prompt_ids, max_new_tokens=64, mode="hash")   # [B, 64]

The decode step reads its inputs from static device buffers (token, position, step) and advances them
itself (argmax, position + 1), so a run of N tokens is N graph replays and no host sync until the end.
"""
from __future__ import annotations

import torch

from .model import ATTENTION_MODES, CacheError, Transformer


class Generator:
    """Holds the static step buffers and the captured graphs of one model (one batch size, one cache).

    cuda_graphs: None = use them on CUDA. Graphs are captured lazily, one per mode, and share one memory
    pool; they stay valid until :meth:`Transformer.setup_caches` is called again (then make a new Generator).
    """

    def __init__(self, model: Transformer, cuda_graphs: bool | None = None, max_new_tokens: int | None = None):
        if model.k_cache is None:
            raise CacheError("call model.setup_caches(...) before making a Generator")
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
        self.fixed_index = None
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- one step ------------------------------------------------------------------------------------
    def _step(self, mode: str):
        logits = self.model.decode_step(self.tok, self.pos, mode, fixed_index=self.fixed_index)
        nxt = logits.argmax(-1)
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
        saved = (self.tok.clone(), self.pos.clone(), self.step.clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up outside the graph (lazy inits, Triton compilation)
            for _ in range(2):
                self._step(mode)
        torch.cuda.current_stream().wait_stream(s)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            self._step(mode)
        self.graphs[mode] = g
        for buf, val in zip((self.tok, self.pos, self.step), saved):
            buf.copy_(val)

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
        """Continue decoding at position ``pos`` (the caches hold pos tokens) with this input token."""
        if not 0 <= pos < self.model.max_seq_len:
            raise CacheError(f"position {pos} is outside the cache of {self.model.max_seq_len} tokens")
        self.pos.fill_(pos)
        self.step.zero_()
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token)
        else:
            self.tok.fill_(token)

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, mode: str = "dense",
                 prefill_chunk: int = 8192) -> torch.Tensor:
        """Greedy continuation of equal-length prompts input_ids [B, T]: returns the new tokens [B, N]."""
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
        logits = m.prefill(input_ids, chunk=prefill_chunk)
        first = logits.argmax(-1)
        self.out[:, 0] = first
        self.tok.copy_(first)
        self.pos.fill_(t)
        self.step.fill_(1)
        self.run_steps(max_new_tokens - 1, mode)
        return self.out[:, :max_new_tokens].clone()

    @torch.no_grad()
    def time_steps(self, mode: str, pos: int, steps: int = 32, warmup: int = 4) -> float:
        """Mean milliseconds per decode step of ``mode`` over ``steps`` steps from position ``pos`` (CUDA
        events around graph replays; the caches must hold ``pos`` tokens)."""
        if pos + max(steps, warmup) > self.model.max_seq_len:
            raise CacheError(f"{max(steps, warmup)} steps from position {pos} overflow the cache of "
                             f"{self.model.max_seq_len} tokens")
        self.set_position(pos)
        self.run_steps(warmup, mode)
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
