"""Prefill attention benchmark: DGA (Triton) against dense flash attention on one GPU.

    python -m dga_hf.bench.attention [--lengths 8192,16384,32768,65536,131072] [--out runs/bench]
                                     [--repeats 5] [--quick] [--train | --train-only] [--train-lengths 16K,32K]
                                     [--expand-blocks E]

Shape: Llama-3-8B attention (32 query heads, 8 kv heads, head dim 128), bf16, batch 1. For each length:

* ``sdpa_flash``: dense causal SDPA restricted to the flash backend (``enable_gqa``, else repeat_kv);
* ``flash_attn``: ``flash_attn.flash_attn_func`` when the package is importable;
* ``dga_<preset>``: the whole DGA path, ``dga_attention(..., backend="triton")``, exactly as shipped
  (layout built in fp32 from the bf16 inputs, stage 5 on the bf16 q/k/v);
* ``layout_<preset>``: stages 1-4 alone (`build_layout` on the bf16 inputs, as the dispatch does);
* ``kernel_<preset>_bf16`` / ``kernel_<preset>_fp32``: stage 5 alone (`triton_backend.attend`) on a prebuilt
  layout;
* ``torch_<preset>``: the PyTorch backend's whole path, only up to 16K (it is slow).

``<preset>``: the shipped presets ``default``, ``expand`` (query-aware expansion, principal score: docs/spec.md
step 6) and ``paper``, and with ``--expand-blocks E`` each again with E expanded blocks, ``<preset>_e<E>``.

With ``--train`` (or ``--train-only``) a training table follows, at ``--train-lengths`` (default 16K, 32K):
one step of forward + backward (gradients of q, k, v for a random dO) of ``sdpa_flash_train``,
``flash_attn_train`` (when installed), ``dga_<preset>_train`` (the whole DGA path, `dga_attention` with
requires_grad inputs, backend="triton": layout, stage 5 forward and backward kernels, the backward through
the layout's gathers and aggregates) and ``kernel_<preset>_bf16_train`` (stage 5 alone:
``triton_backend.attend_forward`` + ``attend_backward`` on a prebuilt layout). ``--train-only`` adds it to
the attention.json / attention.md already in ``--out``.

Reported: median ms over ``--repeats`` timed calls after one warm-up (CUDA events), speed-up over
``sdpa_flash``, the ideal speed-up ``1 / DGAConfig.keys_per_query_share(L)``, useful TFLOP/s
(4 * d * Hq flops per visible (query, key) pair; dense: the causal triangle), executed TFLOP/s (pairs the
kernel computes, whole key chunks), and peak memory above the inputs. Every measurement is wrapped: a
failure (OOM, compile error) is recorded as an error string and the run goes on. Results go to
``<out>/attention.json`` and ``<out>/attention.md``.

The benchmark does not check correctness: the Triton kernels are checked against the PyTorch backend
at this shape and these presets by tests/test_triton_backend.py and tests/test_triton_backward.py, which
scripts/gpu_check.sh runs on the GPU right after the benchmark (the table first, so that a run cut short keeps it).

This module holds the runs and the command line; the inputs and pair counts are in `attention_workload`,
the timing in `timing`, the report in `attention_report`.

On the CPU, the operator against causal SDPA at SmolLM2-135M's and Qwen2.5-0.5B's attention shapes is
``python -m dga_eval.operator_bench`` (in the harness, since it can capture real inputs from the embedded
models; docs/results.md, "CPU operator vs SDPA (issue 14)").
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from . import attention_report
from .attention_workload import LLAMA3_8B, executed_pairs, random_qkv, stage5_inputs, visible_pairs
from .timing import error_text, measure

DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (8192, 32768)
TRAIN_LENGTHS = (16384, 32768)
TORCH_BACKEND_MAX_LEN = 16384
PRESETS = ("default", "expand", "paper")


# ------------------------------------------------------------------------------------------------ prefill
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


def bench_configs(expand_blocks: int = 0) -> dict:
    """The presets by name, and with ``expand_blocks`` > 0 each again with query-aware expansion
    (docs/spec.md step 6) as ``<preset>_e<E>``."""
    from dga_hf.config import DGAConfig

    configs = {name: DGAConfig.preset(name) for name in PRESETS}
    if expand_blocks:
        configs.update({f"{name}_e{expand_blocks}": cfg.replace(expand_blocks=expand_blocks) for name, cfg in list(configs.items())})
    return configs


def run(lengths, out_dir: Path, repeats: int, device: str = "cuda", *, configs: dict | None = None) -> dict:
    """The prefill table at the Llama-3-8B shape (a fresh attention.json / attention.md in out_dir), for
    ``configs`` (name -> DGAConfig; default `bench_configs()`)."""
    from dga_hf.ops import dga_attention, triton_backend

    shape = dict(LLAMA3_8B)
    q_heads, kv_heads, head_dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    group = q_heads // kv_heads
    dtype = torch.bfloat16
    configs = configs or bench_configs()
    meta = _meta(shape, repeats, device, configs)
    print(f"DGA attention benchmark on {meta['device']}: {meta['shape']}", flush=True)

    results: list[dict] = []
    for seq_len in lengths:
        dense_pairs = seq_len * (seq_len + 1) / 2 * q_heads
        try:
            q, k, v = random_qkv(seq_len, device, dtype, q_heads, kv_heads, head_dim)
        except Exception as exc:  # noqa: BLE001
            results.append({"method": "inputs", "seq_len": seq_len, "error": error_text(exc)})
            continue

        sdpa, how = _sdpa_flash(q, k, v)
        measure(results, "sdpa_flash", seq_len, sdpa, repeats, device, variant=how,
                useful_pairs=dense_pairs, executed_pairs=dense_pairs)
        flash = _flash_attn(q, k, v)
        if flash is not None:
            measure(results, "flash_attn", seq_len, flash, repeats, device,
                    useful_pairs=dense_pairs, executed_pairs=dense_pairs)

        for name, cfg in configs.items():
            ideal = 1.0 / cfg.keys_per_query_share(seq_len)
            layout = q32 = k32 = v32 = None
            try:
                q32, k32, v32, scale, build = stage5_inputs(q, k, v, cfg)
                layout = build()
                useful = visible_pairs(layout, cfg, seq_len, group)
                executed = {dt: executed_pairs(layout, cfg, seq_len, group, dt) for dt in (torch.bfloat16, torch.float32)}
            except Exception as exc:  # noqa: BLE001
                results.append({"method": f"prepare_{name}", "seq_len": seq_len, "error": error_text(exc)})
                useful, executed = None, {torch.bfloat16: None, torch.float32: None}
            common = {"preset": name, "ideal_speedup": ideal, "useful_pairs": useful}

            measure(results, f"dga_{name}", seq_len, lambda cfg=cfg, q=q, k=k, v=v: dga_attention(q, k, v, cfg, backend="triton"),
                    repeats, device, executed_pairs=executed[torch.bfloat16], **common)
            if layout is not None:
                measure(results, f"layout_{name}", seq_len, build, repeats, device, preset=name)
                grouped = q.view_as(q32)
                measure(results, f"kernel_{name}_bf16", seq_len,
                        lambda cfg=cfg, layout=layout, grouped=grouped, scale=scale, k=k, v=v:
                        triton_backend.attend(grouped, k, v, layout, cfg, scale),
                        repeats, device, executed_pairs=executed[torch.bfloat16], **common)
                measure(results, f"kernel_{name}_fp32", seq_len,
                        lambda cfg=cfg, layout=layout, scale=scale, q32=q32, k32=k32, v32=v32:
                        triton_backend.attend(q32, k32, v32, layout, cfg, scale),
                        repeats, device, executed_pairs=executed[torch.float32], **common)
            if seq_len <= TORCH_BACKEND_MAX_LEN:
                measure(results, f"torch_{name}", seq_len, lambda cfg=cfg, q=q, k=k, v=v: dga_attention(q, k, v, cfg, backend="torch"),
                        max(1, min(repeats, 3)), device, **common)
            del layout, q32, k32, v32
            if device == "cuda":
                torch.cuda.empty_cache()
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
        _write(out_dir, meta, results, head_dim, done=False)  # partial results survive a timeout

    report, markdown = _write(out_dir, meta, results, head_dim, done=True)
    print(markdown, flush=True)
    print(f"wrote {out_dir / 'attention.json'} and {out_dir / 'attention.md'}", flush=True)
    return report


def _write(out_dir: Path, meta: dict, results: list, head_dim: int, done: bool):
    """Write the prefill report (a fresh attention.json / attention.md in out_dir)."""
    attention_report.derive(results, flops_per_pair=4 * head_dim)
    report = {"meta": {**meta, "complete": done}, "results": results}
    return report, attention_report.save(out_dir, report)


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


def run_training(lengths, out_dir: Path, repeats: int, device: str = "cuda", *,
                 shape: dict | None = None, configs: dict | None = None, dtype=torch.bfloat16) -> dict:
    """Training table: forward + backward of the attention at the Llama-3-8B shape, dense (SDPA flash,
    flash_attn when installed) against the DGA whole path (`dga_attention(..., backend="triton")` with
    requires_grad inputs) and the stage-5 kernels alone. Added to the report in ``out_dir`` (a prefill
    run's attention.json is kept, its "training" section replaced). ``shape`` / ``configs`` (name ->
    DGAConfig) / ``dtype`` override the defaults (tests run it tiny, on CPU, under Triton's interpreter)."""
    from dga_hf.ops import dga_attention

    shape = dict(shape or LLAMA3_8B)
    q_heads, kv_heads, head_dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    group = q_heads // kv_heads
    configs = configs or bench_configs()
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    meta = _meta(shape, repeats, device, configs, dtype)
    print(f"DGA attention training benchmark on {meta['device']}: {meta['shape']}", flush=True)
    report = attention_report.load(out_dir)

    def save(done: bool) -> str:
        attention_report.derive(results, flops_per_pair=attention_report.TRAIN_FLOP_FACTOR * 4 * head_dim,
                                dense_method="sdpa_flash_train")
        report["training"] = {"meta": {**meta, "complete": done}, "results": results}
        return attention_report.save(out_dir, report)

    results: list[dict] = []
    for seq_len in lengths:
        dense_pairs = seq_len * (seq_len + 1) / 2 * q_heads
        try:
            q, k, v = random_qkv(seq_len, device, dtype, q_heads, kv_heads, head_dim)
            grad_out = random_qkv(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=1)[0]
        except Exception as exc:  # noqa: BLE001
            results.append({"method": "inputs", "seq_len": seq_len, "error": error_text(exc)})
            continue
        leaves = [x.requires_grad_() for x in (q, k, v)]

        def measure_step(method, step, step_leaves=(), **extra):
            measure(results, method, seq_len, step, repeats, device, **extra)
            for x in step_leaves:  # the last step's gradients are not part of the next measurement
                x.grad = None

        sdpa, how = _sdpa_flash(q, k, v)
        measure_step("sdpa_flash_train", _train_step(lambda *_, sdpa=sdpa: sdpa(), leaves, grad_out), leaves,
                     variant=how, useful_pairs=dense_pairs)
        flash = _flash_attn_train(q, k, v)
        if flash is not None:
            forward, flash_leaves = flash
            measure_step("flash_attn_train", _train_step(forward, flash_leaves, grad_out.transpose(1, 2).contiguous()),
                         flash_leaves, useful_pairs=dense_pairs)
            del forward, flash_leaves, flash

        for name, cfg in configs.items():
            common = {"preset": name, "ideal_speedup": 1.0 / cfg.keys_per_query_share(seq_len)}
            layout = None
            try:  # the layout of the kernel-alone step (and the useful pair count); built outside the timing
                q32, k32, v32, scale, build = stage5_inputs(q.detach(), k.detach(), v.detach(), cfg)
                layout = build()
                common["useful_pairs"] = visible_pairs(layout, cfg, seq_len, group)
                del q32, k32, v32
            except Exception as exc:  # noqa: BLE001
                results.append({"method": f"prepare_{name}", "seq_len": seq_len, "error": error_text(exc)})
            measure_step(f"dga_{name}_train",
                         _train_step(lambda *x, cfg=cfg: dga_attention(*x, cfg, backend="triton"), leaves, grad_out),
                         leaves, **common)
            if layout is not None:
                measure_step(f"kernel_{name}_{short}_train", _kernel_train_step(q, k, v, grad_out, layout, cfg, scale),
                             **common)
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


# ------------------------------------------------------------------------------------------------ main
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
    parser.add_argument("--train", action="store_true",
                        help="after the prefill table, time forward + backward (the training table)")
    parser.add_argument("--train-only", action="store_true",
                        help="only the training table, added to the report already in --out (if any)")
    parser.add_argument("--train-lengths", type=str, default=None,
                        help=f"lengths of the training table (default {','.join(map(str, TRAIN_LENGTHS))})")
    parser.add_argument("--expand-blocks", type=int, default=0,
                        help="also time each preset with query-aware expansion of this many blocks (expand_blocks)")
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
        print("dga_hf.bench.attention needs a CUDA GPU (none found); on the CPU, time the operator against "
              "SDPA with python -m dga_eval.operator_bench", file=sys.stderr)
        return 2
    configs = bench_configs(args.expand_blocks)
    if not args.train_only:
        run(lengths, args.out, repeats, device="cuda", configs=configs)
    if args.train or args.train_only:
        run_training(train_lengths, args.out, repeats, device="cuda", configs=configs)
    return 0


def _parse_len(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


if __name__ == "__main__":
    sys.exit(main())
