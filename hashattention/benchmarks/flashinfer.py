"""FlashInfer's decode kernels on our cache layout, for the benchmarks (FlashInfer is optional: nothing in the
library needs it).

Our caches are [B, Hkv, N, D]. FlashInfer's paged decode reads pages [pages, page_size, heads, D] (NHD), so
request r = b * Hkv + h holds the G = Hq / Hkv query heads of KV head h with one KV head, and its pages are
page_size consecutive rows of that head: a view of the same cache, nothing copied. With page_size 1 the page
table is a list of rows, so the same wrapper runs over score_select's selected positions (a gather decode).
"""
from __future__ import annotations

import torch


def load():
    """(flashinfer module, None) or (None, why it is not there)."""
    try:
        import flashinfer
        return flashinfer, None
    except Exception as e:  # not on the machine: say why in the results
        return None, f"{type(e).__name__}: {e}"


class PagedRows:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper (CUDA-graph mode) over rows of k_cache / v_cache.

    kc, vc [B, Hkv, N, D] contiguous; N a multiple of page_size; pages_per_req pages per (sequence, KV head)."""

    def __init__(self, fi, kc, vc, page_size: int, pages_per_req: int, tensor_cores: bool):
        b, hkv, n, d = kc.shape
        if not (kc.is_contiguous() and vc.is_contiguous()) or n % page_size:
            raise ValueError(f"PagedRows needs contiguous caches with N % page_size == 0, got {tuple(kc.shape)}")
        dev = kc.device
        self.b, self.hkv, self.ps = b, hkv, page_size
        self.k = kc.view(b * hkv * n // page_size, page_size, 1, d)
        self.v = vc.view(b * hkv * n // page_size, page_size, 1, d)
        r = b * hkv
        self.indptr = torch.arange(r + 1, dtype=torch.int32, device=dev) * pages_per_req
        self.indices = torch.zeros(r * pages_per_req, dtype=torch.int32, device=dev)
        self.last = torch.full((r,), page_size, dtype=torch.int32, device=dev)
        self.row_base = (torch.arange(r, dtype=torch.int32, device=dev) * (n // page_size))[:, None]
        self.ws = torch.zeros(256 << 20, dtype=torch.uint8, device=dev)
        self.w = fi.BatchDecodeWithPagedKVCacheWrapper(
            self.ws, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores, paged_kv_indptr_buffer=self.indptr,
            paged_kv_indices_buffer=self.indices, paged_kv_last_page_len_buffer=self.last)

    def plan(self, hq: int, d: int, dtype):
        """Host-side scheduling, once per shape (the page count per request stays fixed)."""
        self.w.plan(self.indptr, self.indices, self.last, hq // self.hkv, 1, d, self.ps, q_data_type=dtype,
                    kv_data_type=dtype)

    def set_pages(self, pages):
        """pages [B, Hkv, pages_per_req] int: page numbers within each (sequence, KV head), written on the device."""
        self.indices.copy_((pages.reshape(self.b * self.hkv, -1) + self.row_base).reshape(-1))

    def run(self, q):
        """q [B, Hq, D] -> [B, Hq, D]."""
        b, hq, d = q.shape
        return self.w.run(q.reshape(b * self.hkv, hq // self.hkv, d), (self.k, self.v)).reshape(b, hq, d)


def dense_call(fi, q, kc, vc, tensor_cores: bool):
    """A no-argument call of FlashInfer's decode over the whole cache: batch 1 single_decode_with_kv_cache on the
    [Hkv, N, D] cache (HND), batch > 1 the paged decode with pages of 16 rows (N a multiple of 16)."""
    b, hkv, n, d = kc.shape
    if b == 1:
        return lambda: fi.single_decode_with_kv_cache(q[0], kc[0], vc[0], kv_layout="HND",
                                                      use_tensor_cores=tensor_cores)
    pr = PagedRows(fi, kc, vc, 16, n // 16, tensor_cores)
    pr.set_pages(torch.arange(n // 16, dtype=torch.int32, device=kc.device).expand(b, hkv, -1))
    pr.plan(q.shape[1], d, q.dtype)
    return lambda: pr.run(q)


def sparse_call(fi, q, kc, vc, idx, tensor_cores: bool):
    """A no-argument call of FlashInfer's paged decode (pages of one row) over idx [B, Hkv, K], every list full
    (K rows each, as at batch 1 or equal lengths), and the wrapper (its set_pages refills the page table)."""
    pr = PagedRows(fi, kc, vc, 1, idx.shape[2], tensor_cores)
    pr.set_pages(idx)
    pr.plan(q.shape[1], q.shape[2], q.dtype)
    return (lambda: pr.run(q)), pr


def fastest(measure, make, log, what: str):
    """Time make(tensor_cores) for both FlashInfer decode paths; (ms, 'tensor cores' or 'cuda cores') of the faster,
    or (None, None) when both fail."""
    best = (None, None)
    for tc in (False, True):
        try:
            t, _ = measure(make(tc))
        except Exception as e:  # a build or launch the machine refuses: say so, go on
            log(f"flashinfer {what} ({'tensor' if tc else 'cuda'} cores) failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        if best[0] is None or t < best[0]:
            best = (t, "tensor cores" if tc else "cuda cores")
    return best
