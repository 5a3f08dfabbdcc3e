"""Benchmarks of DGA against dense attention (``python -m dga_hf.bench.attention``)."""
