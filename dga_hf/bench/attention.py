"""Prefill attention benchmark: DGA (Triton) against dense flash attention on one GPU.

    python -m dga_hf.bench.attention [--lengths 8192,16384,32768,65536,131072] [--out runs/bench]
                                     [--repeats 5] [--quick] [--train | --train-only] [--train-lengths 16K,32K]

Shape: Llama-3-8B attention (32 query heads, 8 kv heads, head dim 128), bf16, batch 1. For each length:

* ``sdpa_flash``: dense causal SDPA restricted to the flash backend (``enable_gqa``, else repeat_kv);
* ``flash_attn``: ``flash_attn.flash_attn_func`` when the package is importable;
* ``dga_<preset>``: the whole DGA path, ``dga_attention(..., backend="triton")``, exactly as shipped
  (layout built in fp32 from the bf16 inputs, stage 5 on the bf16 q/k/v);
* ``layout_<preset>``: stages 1-4 alone (`build_layout` on the bf16 inputs, as the dispatch does);
* ``kernel_<preset>_bf16`` / ``kernel_<preset>_fp32``: stage 5 alone (`triton_backend.attend`) on a prebuilt
  layout;
* ``torch_<preset>``: the PyTorch backend's whole path, only up to 16K (it is slow).

With ``--train`` (or ``--train-only``) a training table follows, at ``--train-lengths`` (default 16K, 32K):
one step of forward + backward (gradients of q, k, v for a random dO) of ``sdpa_flash_train``,
``flash_attn_train`` (when installed), ``dga_<preset>_train`` (the whole DGA path, `dga_attention` with
requires_grad inputs, backend="triton": layout, stage 5 forward and backward kernels, the backward through
the layout's gathers and aggregates) and ``kernel_<preset>_bf16_train`` (stage 5 alone:
``triton_backend.attend_forward`` + ``attend_backward`` on a prebuilt layout), after a gradient check
(`check_training`). ``--train-only`` adds it to the attention.json / attention.md already in ``--out``.

Reported: median ms over ``--repeats`` timed calls after one warm-up (CUDA events), speed-up over
``sdpa_flash``, the ideal speed-up ``1 / DGAConfig.keys_per_query_share(L)``, useful TFLOP/s
(4 * d * Hq flops per visible (query, key) pair; dense: the causal triangle), executed TFLOP/s (pairs the
kernel computes, whole key chunks), and peak memory above the inputs. Every measurement is wrapped: a
failure (OOM, compile error) is recorded as an error string and the run goes on. Results go to
``<out>/attention.json`` and ``<out>/attention.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

LLAMA3_8B = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (8192, 32768)
TRAIN_LENGTHS = (16384, 32768)
# forward + backward flops per visible (query, key) pair, in units of the forward's 4 * d: the backward
# does 5 matmuls to the forward's 2, i.e. 2.5x (the FlashAttention papers' count)
TRAIN_FLOP_FACTOR = 3.5
TORCH_BACKEND_MAX_LEN = 16384
PRESETS = ("default", "paper")


# ---------------------------------------------------------------------------------------------- helpers
def _inputs(seq_len: int, device, dtype, q_heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape_q, shape_kv = (1, q_heads, seq_len, head_dim), (1, kv_heads, seq_len, head_dim)
    q = torch.randn(shape_q, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(shape_kv, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape_kv, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def _prepared(q, k, v, config):
    """Grouped fp32 copies of q, k, v (for the checks and the fp32 kernel row) and a builder of the layout
    from the model-dtype inputs, as the dispatch builds it before stage 5 (no padding)."""
    from dga_hf.ops.layout import build_layout

    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = head_dim**-0.5
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    q32, k32, v32 = grouped.float(), k.float(), v.float()
    lengths = torch.full((batch,), seq_len, dtype=torch.long, device=q.device)
    return q32, k32, v32, lengths, scale, (lambda: build_layout(grouped, k, v, lengths, config, scale))


def visible_pairs(layout, config, seq_len: int, group: int) -> float:
    """Sum over real queries and query heads of the keys a query really sees (focal + aggregates of
    non-empty old blocks + local window)."""
    m, n = config.group_size, config.local_blocks
    device = layout.focal_pos.device
    pos = torch.arange(seq_len, device=device)
    first_local_block = pos // m - n + 1  # [L]
    start = first_local_block.clamp(min=0) * m
    local = (pos - start + 1).double()
    batch, heads, _ = layout.focal_pos.shape
    limits = start.view(1, 1, -1).expand(batch, heads, -1).contiguous()
    focal = torch.searchsorted(layout.focal_pos.contiguous(), limits).double()  # [B, H, L]
    nonempty = torch.isfinite(layout.agg_bias).double().cumsum(-1)  # [B, H, nb]
    nonempty = torch.cat([torch.zeros_like(nonempty[..., :1]), nonempty], dim=-1)
    aggs = nonempty.gather(-1, first_local_block.clamp(min=0).view(1, 1, -1).expand(batch, heads, -1))
    real = (pos[None, :] < layout.lengths[:, None].to(device)).double()[:, None, :]
    return float(((local + focal + aggs) * real).sum()) * group


def executed_pairs(layout, config, seq_len: int, group: int, dtype) -> float:
    """(query, key) pairs the kernel computes: whole key chunks per tile, for every row of the tile."""
    from dga_hf.ops import triton_backend

    d, dv = layout.agg_key.shape[-1], layout.agg_value.shape[-1]
    plan = triton_backend.plan(group, dtype, d, dv)
    block_m, chunk = plan["BLOCK_M"], plan["BLOCK_N"]
    m, n = config.group_size, config.local_blocks
    counts = triton_backend.focal_tile_counts(layout.focal_pos, layout.lengths, config, seq_len, block_m).long()
    tiles = counts.shape[2]
    device = counts.device
    q0 = torch.arange(tiles, device=device) * block_m
    lengths = layout.lengths.to(device)[:, None]
    live = (q0[None, :] < lengths).long()  # [B, T]
    q_last = torch.maximum(torch.minimum(q0 + block_m, lengths) - 1, q0)
    old_hi = ((q_last // m) - n + 1).clamp(min=0) * live
    win_lo = ((q0 // m) - n + 1).clamp(min=0) * m
    window = (q_last + 1 - win_lo) * live

    def whole(count):
        return (count + chunk - 1) // chunk * chunk

    per_tile = whole(counts[..., 1] * live[:, None]) + (whole(old_hi) + whole(window))[:, None]  # [B, H, T]
    return float(per_tile.sum()) * block_m * group


def _time(fn, repeats: int, device) -> dict:
    """Median ms of `repeats` calls after one warm-up, and the peak memory above what was allocated."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = fn()  # warm-up (and compilation)
    del out
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - tic) * 1e3)
        del out
    result = {"ms": statistics.median(times), "ms_all": [round(t, 4) for t in times]}
    if cuda:
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def _measure(results: list, name: str, seq_len: int, fn, repeats: int, device, **extra) -> dict:
    entry = {"method": name, "seq_len": seq_len, **extra}
    try:
        entry.update(_time(fn, repeats, device))
    except Exception as exc:  # noqa: BLE001 - one failure (OOM, compile error) must not end the run
        entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        entry["traceback"] = traceback.format_exc(limit=4)[-2000:]
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    results.append(entry)
    status = f"{entry['ms']:.3f} ms" if "ms" in entry else f"ERROR {entry['error']}"
    print(f"  L={seq_len:>6} {name:<28} {status}", flush=True)
    return entry


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]

    def gqa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def repeat_kv():
        kk = k.repeat_interleave(group, dim=1)
        vv = v.repeat_interleave(group, dim=1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    try:
        gqa()
        return gqa, "enable_gqa"
    except RuntimeError:
        return repeat_kv, "repeat_kv"


def _flash_attn(q, k, v):
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - not installed or broken build: just skip
        return None
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, L, H, d]
    return lambda: flash_attn_func(qt, kt, vt, causal=True)


# ------------------------------------------------------------------------------------ correctness check
def check_backends(seq_len: int = 4096, device="cuda", q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                   dtype=torch.bfloat16, config=None) -> dict:
    """Triton vs PyTorch backend on one size: the whole dispatch path (output in the model dtype), stage 5
    alone in fp32 on the same layout, and stage 5 fed the model dtype (vs the fp32 PyTorch stage 5)."""
    from dga_hf.config import DGAConfig
    from dga_hf.ops import dga_attention, torch_backend, triton_backend

    config = config or DGAConfig.preset("default")
    q, k, v = _inputs(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=1)
    got = dga_attention(q, k, v, config, backend="triton").float()
    ref = dga_attention(q, k, v, config, backend="torch").float()
    report = {
        "seq_len": seq_len,
        "dtype": str(dtype),
        "config": config.to_dict(),
        "max_abs_err": float((got - ref).abs().max()),
        "ref_max_abs": float(ref.abs().max()),
        "finite": bool(torch.isfinite(got).all()),
    }
    del got, ref
    q32, k32, v32, _, scale, build = _prepared(q, k, v, config)
    layout = build()
    ref = torch_backend.attend(q32, k32, v32, layout, config, scale)
    got = triton_backend.attend(q32, k32, v32, layout, config, scale)
    report["stage5_fp32_max_abs_err"] = float((got - ref).abs().max())
    grouped = q.view_as(q32)
    got = triton_backend.attend(grouped, k, v, layout, config, scale).float()
    report["stage5_model_dtype_max_abs_err"] = float((got - ref).abs().max())
    report["stage5_model_dtype_mean_abs_err"] = float((got - ref).abs().mean())
    if not report["finite"]:
        report["max_abs_err"] = math.inf
    return report


def _max_rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (0 for an all-zero reference that is matched exactly)."""
    err = float((got.float() - ref.float()).abs().max()) if got.numel() else 0.0
    scale = float(ref.float().abs().max()) if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def check_training(seq_len: int = 4096, device="cuda", q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                   dtype=torch.bfloat16, config=None) -> dict:
    """Gradients, Triton vs PyTorch backend on one size: stage 5 alone on one layout (the Triton
    ``attend_forward``/``attend_backward`` fed the model dtype, against the PyTorch backend's in fp32), and
    the whole path (autograd through ``dga_attention``, gradients of q, k, v). Errors are relative to the
    largest |gradient| of each tensor; the worst of the seven (stage 5) / three (whole path) is reported."""
    from dga_hf.config import DGAConfig
    from dga_hf.ops import dga_attention, torch_backend, triton_backend

    config = config or DGAConfig.preset("default")
    q, k, v = _inputs(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=2)
    grad_out = _inputs(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=3)[0]
    report = {"seq_len": seq_len, "dtype": str(dtype), "config": config.to_dict()}

    q32, k32, v32, _, scale, build = _prepared(q, k, v, config)
    layout = build()
    do32 = grad_out.float().view_as(q32)
    out, lse = torch_backend.attend_forward(q32, k32, v32, layout, config, scale)
    ref = torch_backend.attend_backward(q32, k32, v32, layout, config, scale, out, lse, do32)
    del out, lse
    grouped = q.view_as(q32)
    out, lse = triton_backend.attend_forward(grouped, k, v, layout, config, scale)
    got = triton_backend.attend_backward(grouped, k, v, layout, config, scale, out, lse, grad_out.view_as(q32))
    names = ("query", "key", "value", "focal_key", "focal_value", "agg_key", "agg_value")
    errors = {name: _max_rel_err(g, r) for name, g, r in zip(names, got, ref)}
    report["stage5_grad_rel_err"] = errors
    report["stage5_grad_max_rel_err"] = max(errors.values())
    report["stage5_grads_finite"] = all(bool(torch.isfinite(g).all()) for g in got)
    del got, ref, out, lse, layout, q32, k32, v32, do32

    grads = {}
    for backend in ("triton", "torch"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        dga_attention(*leaves, config, backend=backend).backward(grad_out)
        grads[backend] = [x.grad for x in leaves]
        del leaves
    errors = {name: _max_rel_err(g, r) for name, g, r in zip(names, grads["triton"], grads["torch"])}
    report["whole_grad_rel_err"] = errors
    report["whole_grad_max_rel_err"] = max(errors.values())
    if not report["stage5_grads_finite"] or not all(bool(torch.isfinite(g).all()) for g in grads["triton"]):
        report["stage5_grad_max_rel_err"] = report["whole_grad_max_rel_err"] = math.inf
    return report


# ------------------------------------------------------------------------------------------------- main
def run(lengths, out_dir: Path, repeats: int, device: str = "cuda", check_len: int = 4096) -> dict:
    from dga_hf.config import DGAConfig
    from dga_hf.ops import dga_attention, triton_backend

    shape = dict(LLAMA3_8B)
    q_heads, kv_heads, head_dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    group = q_heads // kv_heads
    dtype = torch.bfloat16
    configs = {name: DGAConfig.preset(name) for name in PRESETS}
    meta = _meta(shape, repeats, device, configs)
    print(f"DGA attention benchmark on {meta['device']}: {meta['shape']}", flush=True)

    checks = []
    for name, cfg in configs.items():
        try:
            report = check_backends(check_len, device, q_heads, kv_heads, head_dim, dtype, cfg)
        except Exception as exc:  # noqa: BLE001
            report = {"seq_len": check_len, "error": f"{type(exc).__name__}: {exc}"[:300]}
        report["preset"] = name
        checks.append(report)
        print(f"check {name} L={check_len}: {json.dumps({k: v for k, v in report.items() if k != 'config'})}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    results: list[dict] = []
    for seq_len in lengths:
        dense_pairs = seq_len * (seq_len + 1) / 2 * q_heads
        try:
            q, k, v = _inputs(seq_len, device, dtype, q_heads, kv_heads, head_dim)
        except Exception as exc:  # noqa: BLE001
            results.append({"method": "inputs", "seq_len": seq_len, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue

        sdpa, how = _sdpa_flash(q, k, v)
        _measure(results, "sdpa_flash", seq_len, sdpa, repeats, device, variant=how,
                 useful_pairs=dense_pairs, executed_pairs=dense_pairs)
        flash = _flash_attn(q, k, v)
        if flash is not None:
            _measure(results, "flash_attn", seq_len, flash, repeats, device,
                     useful_pairs=dense_pairs, executed_pairs=dense_pairs)

        for name, cfg in configs.items():
            ideal = 1.0 / cfg.keys_per_query_share(seq_len)
            layout = q32 = k32 = v32 = None
            try:
                q32, k32, v32, lengths_t, scale, build = _prepared(q, k, v, cfg)
                layout = build()
                useful = visible_pairs(layout, cfg, seq_len, group)
                executed = {dt: executed_pairs(layout, cfg, seq_len, group, dt) for dt in (torch.bfloat16, torch.float32)}
            except Exception as exc:  # noqa: BLE001
                results.append({"method": f"prepare_{name}", "seq_len": seq_len, "error": f"{type(exc).__name__}: {exc}"[:300]})
                useful, executed = None, {torch.bfloat16: None, torch.float32: None}
            common = {"preset": name, "ideal_speedup": ideal, "useful_pairs": useful}

            _measure(results, f"dga_{name}", seq_len, lambda cfg=cfg, q=q, k=k, v=v: dga_attention(q, k, v, cfg, backend="triton"),
                     repeats, device, executed_pairs=executed[torch.bfloat16], **common)
            if layout is not None:
                _measure(results, f"layout_{name}", seq_len, build, repeats, device, preset=name)
                grouped = q.view_as(q32)
                _measure(results, f"kernel_{name}_bf16", seq_len,
                         lambda cfg=cfg, layout=layout, grouped=grouped, scale=scale, k=k, v=v:
                         triton_backend.attend(grouped, k, v, layout, cfg, scale),
                         repeats, device, executed_pairs=executed[torch.bfloat16], **common)
                _measure(results, f"kernel_{name}_fp32", seq_len,
                         lambda cfg=cfg, layout=layout, scale=scale, q32=q32, k32=k32, v32=v32:
                         triton_backend.attend(q32, k32, v32, layout, cfg, scale),
                         repeats, device, executed_pairs=executed[torch.float32], **common)
            if seq_len <= TORCH_BACKEND_MAX_LEN:
                _measure(results, f"torch_{name}", seq_len, lambda cfg=cfg, q=q, k=k, v=v: dga_attention(q, k, v, cfg, backend="torch"),
                         max(1, min(repeats, 3)), device, **common)
            del layout, q32, k32, v32
            if device == "cuda":
                torch.cuda.empty_cache()
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
        _write(out_dir, meta, checks, results, head_dim, done=False)  # partial results survive a timeout

    report, markdown = _write(out_dir, meta, checks, results, head_dim, done=True)
    print(markdown, flush=True)
    print(f"wrote {out_dir / 'attention.json'} and {out_dir / 'attention.md'}", flush=True)
    return report


# ------------------------------------------------------------------------------------------------ training
def _train_step(forward, leaves: list, grad_out: torch.Tensor):
    """One training step of the attention alone: forward(*leaves), backward of grad_out into leaves' .grad."""

    def step():
        for x in leaves:
            x.grad = None
        out = forward(*leaves)
        if not out.requires_grad:
            raise RuntimeError("the forward returned an output without autograd history: no training path")
        out.backward(grad_out)

    return step


def _flash_attn_train(q, k, v):
    """flash_attn_func on its own [B, L, H, d] leaves (so every step backpropagates into fresh leaves)."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - not installed or broken build: just skip
        return None
    leaves = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    return (lambda qt, kt, vt: flash_attn_func(qt, kt, vt, causal=True)), leaves


def _kernel_train_step(q, k, v, grad_out, layout, config, scale):
    """Stage 5 alone, forward + backward kernels (no autograd), on the model dtype."""
    from dga_hf.ops import triton_backend

    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.detach().view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    d_out = grad_out.view_as(grouped)
    k, v = k.detach(), v.detach()

    def step():
        out, lse = triton_backend.attend_forward(grouped, k, v, layout, config, scale)
        return triton_backend.attend_backward(grouped, k, v, layout, config, scale, out, lse, d_out)

    return step


def run_training(lengths, out_dir: Path, repeats: int, device: str = "cuda", check_len: int = 4096, *,
                 shape: dict | None = None, configs: dict | None = None, dtype=torch.bfloat16) -> dict:
    """Training table: forward + backward of the attention at the Llama-3-8B shape, dense (SDPA flash,
    flash_attn when installed) against the DGA whole path (`dga_attention(..., backend="triton")` with
    requires_grad inputs) and the stage-5 kernels alone. Added to the report in ``out_dir`` (a prefill
    run's attention.json is kept, its "training" section replaced). ``shape`` / ``configs`` (name ->
    DGAConfig) / ``dtype`` override the defaults (tests run it tiny, on CPU, under Triton's interpreter)."""
    from dga_hf.config import DGAConfig
    from dga_hf.ops import dga_attention

    shape = dict(shape or LLAMA3_8B)
    q_heads, kv_heads, head_dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    group = q_heads // kv_heads
    configs = configs or {name: DGAConfig.preset(name) for name in PRESETS}
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    meta = _meta(shape, repeats, device, configs, dtype)
    print(f"DGA attention training benchmark on {meta['device']}: {meta['shape']}", flush=True)
    report = _load(out_dir)

    def save(done: bool) -> str:
        _derive(results, flops_per_pair=TRAIN_FLOP_FACTOR * 4 * head_dim, dense_method="sdpa_flash_train")
        report["training"] = {"meta": {**meta, "complete": done}, "checks": checks, "results": results}
        return _save(out_dir, report)

    checks: list[dict] = []
    results: list[dict] = []
    for name, cfg in configs.items():
        try:
            check = check_training(check_len, device, q_heads, kv_heads, head_dim, dtype, cfg)
        except Exception as exc:  # noqa: BLE001
            check = {"seq_len": check_len, "error": f"{type(exc).__name__}: {exc}"[:300]}
        check["preset"] = name
        checks.append(check)
        print(f"gradient check {name} L={check_len}: "
              f"{json.dumps({k: v for k, v in check.items() if k != 'config'}, default=str)}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    save(done=False)

    for seq_len in lengths:
        dense_pairs = seq_len * (seq_len + 1) / 2 * q_heads
        try:
            q, k, v = _inputs(seq_len, device, dtype, q_heads, kv_heads, head_dim)
            grad_out = _inputs(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=1)[0]
        except Exception as exc:  # noqa: BLE001
            results.append({"method": "inputs", "seq_len": seq_len, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        leaves = [x.requires_grad_() for x in (q, k, v)]

        def measure(method, step, step_leaves=(), **extra):
            _measure(results, method, seq_len, step, repeats, device, **extra)
            for x in step_leaves:  # the last step's gradients are not part of the next measurement
                x.grad = None

        sdpa, how = _sdpa_flash(q, k, v)
        measure("sdpa_flash_train", _train_step(lambda *_, sdpa=sdpa: sdpa(), leaves, grad_out), leaves,
                variant=how, useful_pairs=dense_pairs)
        flash = _flash_attn_train(q, k, v)
        if flash is not None:
            forward, flash_leaves = flash
            measure("flash_attn_train", _train_step(forward, flash_leaves, grad_out.transpose(1, 2).contiguous()),
                    flash_leaves, useful_pairs=dense_pairs)
            del forward, flash_leaves, flash

        for name, cfg in configs.items():
            common = {"preset": name, "ideal_speedup": 1.0 / cfg.keys_per_query_share(seq_len)}
            layout = None
            try:  # the layout of the kernel-alone step (and the useful pair count); built outside the timing
                q32, k32, v32, _, scale, build = _prepared(q.detach(), k.detach(), v.detach(), cfg)
                layout = build()
                common["useful_pairs"] = visible_pairs(layout, cfg, seq_len, group)
                del q32, k32, v32
            except Exception as exc:  # noqa: BLE001
                results.append({"method": f"prepare_{name}", "seq_len": seq_len, "error": f"{type(exc).__name__}: {exc}"[:300]})
            measure(f"dga_{name}_train",
                    _train_step(lambda *x, cfg=cfg: dga_attention(*x, cfg, backend="triton"), leaves, grad_out),
                    leaves, **common)
            if layout is not None:
                measure(f"kernel_{name}_{short}_train", _kernel_train_step(q, k, v, grad_out, layout, cfg, scale), **common)
            del layout
            if device == "cuda":
                torch.cuda.empty_cache()
        del q, k, v, grad_out, leaves, sdpa
        if device == "cuda":
            torch.cuda.empty_cache()
        save(done=False)  # partial results survive a timeout

    markdown = save(done=True)
    print(markdown, flush=True)
    print(f"wrote the training table to {out_dir / 'attention.json'} and {out_dir / 'attention.md'}", flush=True)
    return report


def _meta(shape: dict, repeats: int, device: str, configs: dict, dtype=torch.bfloat16) -> dict:
    from dga_hf.ops import triton_backend

    meta = {
        "shape": {**shape, "batch": 1, "dtype": str(dtype).removeprefix("torch.")},
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": repeats,
        "configs": {name: cfg.to_dict() for name, cfg in configs.items()},
        "fp32_dot_precision": triton_backend.FP32_DOT_PRECISION,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        meta["triton"] = None
    return meta


def _write(out_dir: Path, meta: dict, checks: list, results: list, head_dim: int, done: bool):
    """Write the prefill report (a fresh attention.json / attention.md in out_dir)."""
    _derive(results, flops_per_pair=4 * head_dim)
    report = {"meta": {**meta, "complete": done}, "checks": checks, "results": results}
    return report, _save(out_dir, report)


def _save(out_dir: Path, report: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = to_markdown(report)
    (out_dir / "attention.md").write_text(markdown)
    return markdown


def _load(out_dir: Path) -> dict:
    """The report already in out_dir (a prefill run's), or {} when there is none or it is unreadable."""
    try:
        report = json.loads((out_dir / "attention.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _derive(results: list[dict], flops_per_pair: float, dense_method: str = "sdpa_flash") -> None:
    dense = {r["seq_len"]: r["ms"] for r in results if r["method"] == dense_method and "ms" in r}
    for r in results:
        if "ms" not in r:
            continue
        seconds = r["ms"] / 1e3
        if r.get("useful_pairs"):
            r["useful_tflops"] = r["useful_pairs"] * flops_per_pair / seconds / 1e12
        if r.get("executed_pairs"):
            r["executed_tflops"] = r["executed_pairs"] * flops_per_pair / seconds / 1e12
        if r["seq_len"] in dense and not r["method"].startswith("layout_"):
            r["speedup_vs_sdpa"] = dense[r["seq_len"]] / r["ms"]
            if r.get("ideal_speedup"):
                r["share_of_ideal"] = r["speedup_vs_sdpa"] / r["ideal_speedup"]


def _fmt(value, spec) -> str:
    return "" if value is None else format(value, spec)


def to_markdown(report: dict) -> str:
    """The prefill section (when the report has one) and the training section (when it has one)."""
    lines = _prefill_markdown(report) if "results" in report else ["# DGA attention benchmark", ""]
    if "training" in report:
        lines += _training_markdown(report["training"])
    return "\n".join(lines) + "\n"


def _prefill_markdown(report: dict) -> list[str]:
    meta = report["meta"]
    lines = [
        f"# DGA attention benchmark ({meta['device']})",
        "",
        f"Shape {meta['shape']}; torch {meta['torch']}, triton {meta.get('triton')}; median of {meta['repeats']} "
        f"calls after a warm-up; fp32 kernel dots: {meta['fp32_dot_precision']}."
        + ("" if meta.get("complete", True) else " PARTIAL (the run stopped early)."),
        "",
        "Correctness (Triton vs PyTorch backend):",
        "",
    ]
    for c in report["checks"]:
        if "error" in c:
            lines.append(f"- {c['preset']} L={c['seq_len']}: ERROR {c['error']}")
        else:
            lines.append(
                f"- {c['preset']} L={c['seq_len']}: whole path max |err| {c['max_abs_err']:.2e} "
                f"(|ref| max {c['ref_max_abs']:.2f}); stage 5 fp32 max |err| {c['stage5_fp32_max_abs_err']:.2e}; "
                f"stage 5 on bf16 max |err| {c['stage5_model_dtype_max_abs_err']:.2e}, "
                f"mean {c['stage5_model_dtype_mean_abs_err']:.2e}"
            )
    lines += [
        "",
        "| L | method | ms | speed-up vs SDPA | ideal | share of ideal | useful TFLOP/s | executed TFLOP/s | peak MiB | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    fmt = _fmt
    for r in report["results"]:
        note = r.get("error", "") or r.get("variant", "")
        lines.append(
            f"| {r['seq_len']} | {r['method']} | {fmt(r.get('ms'), '.3f')} | {fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{fmt(r.get('ideal_speedup'), '.2f')} | {fmt(r.get('share_of_ideal'), '.2f')} | "
            f"{fmt(r.get('useful_tflops'), '.1f')} | {fmt(r.get('executed_tflops'), '.1f')} | "
            f"{fmt(r.get('peak_mib'), '.0f')} | {note.replace('|', '/')} |"
        )
    return lines


def _training_markdown(training: dict) -> list[str]:
    meta = training["meta"]
    lines = [
        "",
        "## Training (forward + backward)",
        "",
        f"One training step of the attention alone (forward, then backward of a random dO; gradients of q, k, v) "
        f"on {meta['device']}, shape {meta['shape']}; torch {meta['torch']}, triton {meta.get('triton')}; median of "
        f"{meta['repeats']} steps after a warm-up. Useful TFLOP/s count {TRAIN_FLOP_FACTOR} x 4 x d flops per "
        f"visible (query, key) pair (backward = 2.5 x forward, as FlashAttention counts)."
        + ("" if meta.get("complete", True) else " PARTIAL (the run stopped early)."),
        "",
        "Gradient check (Triton vs PyTorch backend, max |err| / max |grad|, worst tensor):",
        "",
    ]
    for c in training["checks"]:
        if "error" in c:
            lines.append(f"- {c['preset']} L={c['seq_len']}: ERROR {c['error']}")
        else:
            lines.append(
                f"- {c['preset']} L={c['seq_len']}: stage 5 (Triton on {c.get('dtype')} vs PyTorch in fp32) "
                f"{c['stage5_grad_max_rel_err']:.2e}; whole path {c['whole_grad_max_rel_err']:.2e}"
            )
    lines += [
        "",
        "| L | method | ms | speed-up vs SDPA | ideal | useful TFLOP/s | peak MiB | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in training["results"]:
        note = r.get("error", "") or r.get("variant", "")
        lines.append(
            f"| {r['seq_len']} | {r['method']} | {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{_fmt(r.get('ideal_speedup'), '.2f')} | {_fmt(r.get('useful_tflops'), '.1f')} | "
            f"{_fmt(r.get('peak_mib'), '.0f')} | {note.replace('|', '/')} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dga_hf.bench.attention",
        description="Time DGA prefill attention (Triton) against dense flash attention at Llama-3-8B shape; "
                    "with --train also one training step (forward + backward).",
    )
    parser.add_argument("--lengths", type=str, default=None,
                        help="comma-separated sequence lengths (K suffix allowed: 8K,32K); "
                             f"default {','.join(map(str, DEFAULT_LENGTHS))}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5, --quick 3)")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} and 3 repeats")
    parser.add_argument("--check-len", type=int, default=4096, help="length of the pre-timing correctness checks")
    parser.add_argument("--train", action="store_true",
                        help="after the prefill table, time forward + backward (the training table)")
    parser.add_argument("--train-only", action="store_true",
                        help="only the training table, added to the report already in --out (if any)")
    parser.add_argument("--train-lengths", type=str, default=None,
                        help=f"lengths of the training table (default {','.join(map(str, TRAIN_LENGTHS))})")
    args = parser.parse_args(argv)

    if args.lengths:
        lengths = [_parse_len(x) for x in args.lengths.split(",") if x.strip()]
    else:
        lengths = list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    if args.train_lengths:
        train_lengths = [_parse_len(x) for x in args.train_lengths.split(",") if x.strip()]
    else:
        train_lengths = list(TRAIN_LENGTHS)
    repeats = args.repeats or (3 if args.quick else 5)
    if not torch.cuda.is_available():
        print("dga_hf.bench.attention needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    if not args.train_only:
        run(lengths, args.out, repeats, device="cuda", check_len=args.check_len)
    if args.train or args.train_only:
        run_training(train_lengths, args.out, repeats, device="cuda", check_len=args.check_len)
    return 0


def _parse_len(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


if __name__ == "__main__":
    sys.exit(main())
