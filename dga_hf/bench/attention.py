"""Prefill attention benchmark: DGA (Triton) against dense flash attention on one GPU.

    python -m dga_hf.bench.attention [--lengths 8192,16384,32768,65536,131072] [--out runs/bench]
                                     [--repeats 5] [--quick]

Shape: Llama-3-8B attention (32 query heads, 8 kv heads, head dim 128), bf16, batch 1. For each length:

* ``sdpa_flash``: dense causal SDPA restricted to the flash backend (``enable_gqa``, else repeat_kv);
* ``flash_attn``: ``flash_attn.flash_attn_func`` when the package is importable;
* ``dga_<preset>``: the whole DGA path, ``dga_attention(..., backend="triton")``, exactly as shipped
  (today the dispatch computes in fp32, so stage 5 runs the fp32 kernel);
* ``dga_<preset>_bf16attend``: the same stages with stage 5 fed bf16 q/k/v (layout still built in fp32),
  i.e. what the whole path costs once the dispatch passes the model dtype to the Triton kernel;
* ``layout_<preset>``: stages 1-4 alone (`build_layout` on fp32 copies, as the dispatch does);
* ``kernel_<preset>_bf16`` / ``kernel_<preset>_fp32``: stage 5 alone (`triton_backend.attend`) on a prebuilt
  layout;
* ``torch_<preset>``: the PyTorch backend's whole path, only up to 16K (it is slow).

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
    """What the dispatch builds before stage 5 (no padding): grouped fp32 q, fp32 k/v, the layout."""
    from dga_hf.ops.layout import build_layout

    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = head_dim**-0.5
    q32 = q.float().view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    k32, v32 = k.float(), v.float()
    lengths = torch.full((batch,), seq_len, dtype=torch.long, device=q.device)
    return q32, k32, v32, lengths, scale, (lambda: build_layout(q32, k32, v32, lengths, config, scale))


def _bf16attend_path(q, k, v, config):
    """Whole DGA path with stage 5 on the model dtype: fp32 layout (as the dispatch), kernel on q/k/v."""
    from dga_hf.ops import triton_backend
    from dga_hf.ops.layout import build_layout

    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = head_dim**-0.5
    q32 = q.float().view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    lengths = torch.full((batch,), seq_len, dtype=torch.long, device=q.device)
    layout = build_layout(q32, k.float(), v.float(), lengths, config, scale)
    del q32
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    return triton_backend.attend(grouped, k, v, layout, config, scale).view(batch, q_heads, seq_len, -1)


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


# ------------------------------------------------------------------------------------------------- main
def run(lengths, out_dir: Path, repeats: int, device: str = "cuda", check_len: int = 4096) -> dict:
    from dga_hf.config import DGAConfig
    from dga_hf.ops import dga_attention, triton_backend

    shape = dict(LLAMA3_8B)
    q_heads, kv_heads, head_dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    group = q_heads // kv_heads
    dtype = torch.bfloat16
    configs = {name: DGAConfig.preset(name) for name in PRESETS}
    meta = {
        "shape": {**shape, "batch": 1, "dtype": "bfloat16"},
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

            _measure(results, f"dga_{name}", seq_len, lambda cfg=cfg: dga_attention(q, k, v, cfg, backend="triton"),
                     repeats, device, executed_pairs=executed[torch.float32], **common)
            _measure(results, f"dga_{name}_bf16attend", seq_len, lambda cfg=cfg: _bf16attend_path(q, k, v, cfg),
                     repeats, device, executed_pairs=executed[torch.bfloat16], **common)
            if layout is not None:
                _measure(results, f"layout_{name}", seq_len, build, repeats, device, preset=name)
                grouped = q.view_as(q32)
                _measure(results, f"kernel_{name}_bf16", seq_len,
                         lambda cfg=cfg, layout=layout, grouped=grouped, scale=scale:
                         triton_backend.attend(grouped, k, v, layout, cfg, scale),
                         repeats, device, executed_pairs=executed[torch.bfloat16], **common)
                _measure(results, f"kernel_{name}_fp32", seq_len,
                         lambda cfg=cfg, layout=layout, scale=scale: triton_backend.attend(q32, k32, v32, layout, cfg, scale),
                         repeats, device, executed_pairs=executed[torch.float32], **common)
            if seq_len <= TORCH_BACKEND_MAX_LEN:
                _measure(results, f"torch_{name}", seq_len, lambda cfg=cfg: dga_attention(q, k, v, cfg, backend="torch"),
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


def _write(out_dir: Path, meta: dict, checks: list, results: list, head_dim: int, done: bool):
    _derive(results, flops_per_pair=4 * head_dim)
    report = {"meta": {**meta, "complete": done}, "checks": checks, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = to_markdown(report)
    (out_dir / "attention.md").write_text(markdown)
    return report, markdown


def _derive(results: list[dict], flops_per_pair: int) -> None:
    dense = {r["seq_len"]: r["ms"] for r in results if r["method"] == "sdpa_flash" and "ms" in r}
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


def to_markdown(report: dict) -> str:
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

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for r in report["results"]:
        note = r.get("error", "") or r.get("variant", "")
        lines.append(
            f"| {r['seq_len']} | {r['method']} | {fmt(r.get('ms'), '.3f')} | {fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{fmt(r.get('ideal_speedup'), '.2f')} | {fmt(r.get('share_of_ideal'), '.2f')} | "
            f"{fmt(r.get('useful_tflops'), '.1f')} | {fmt(r.get('executed_tflops'), '.1f')} | "
            f"{fmt(r.get('peak_mib'), '.0f')} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dga_hf.bench.attention",
        description="Time DGA prefill attention (Triton) against dense flash attention at Llama-3-8B shape.",
    )
    parser.add_argument("--lengths", type=str, default=None,
                        help="comma-separated sequence lengths (K suffix allowed: 8K,32K); "
                             f"default {','.join(map(str, DEFAULT_LENGTHS))}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder (default runs/bench)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5, --quick 3)")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} and 3 repeats")
    parser.add_argument("--check-len", type=int, default=4096, help="length of the pre-timing correctness check")
    args = parser.parse_args(argv)

    if args.lengths:
        lengths = [_parse_len(x) for x in args.lengths.split(",") if x.strip()]
    else:
        lengths = list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    repeats = args.repeats or (3 if args.quick else 5)
    if not torch.cuda.is_available():
        print("dga_hf.bench.attention needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    run(lengths, args.out, repeats, device="cuda", check_len=args.check_len)
    return 0


def _parse_len(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


if __name__ == "__main__":
    sys.exit(main())
