"""The CPU operator benchmark (`python -m dga_eval.operator_bench`), at tiny lengths: the report's structure,
its ratios computed from the numbers it reports, and the capture of a layer's real q, k, v."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.nn.functional as F

from dga_eval import operator_bench
from dga_hf import DGAConfig

from helpers import make_model, random_ids

DENSE_EQUIVALENT = DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=4, local_blocks=64, min_seq_len=8, backend="torch")
SPARSE = DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=4, local_blocks=2, expand_blocks=2, min_seq_len=8, backend="torch")


def test_report_rows_and_ratios_come_from_its_numbers(tmp_path):
    lengths, shapes = [48, 96], ["smollm2-135m", "qwen2.5-0.5b"]
    configs = {"dense_equivalent": DENSE_EQUIVALENT, "sparse": SPARSE}
    report = operator_bench.run(lengths, shapes, "random", configs, repeats=2, out_dir=tmp_path)

    saved = json.loads((tmp_path / "operator_cpu.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["meta"]["inputs"] == "random" and saved["meta"]["repeats"] == 2
    assert "load_average_end" in saved["meta"]
    cells = [(r["shape"], r["seq_len"], r["config"]) for r in saved["results"]]
    assert sorted(cells) == sorted((s, n, c) for s in shapes for n in lengths for c in configs)
    for row in saved["results"]:
        assert "dga_error" not in row and "sdpa_error" not in row and "layout_error" not in row
        for method in ("dga", "layout", "sdpa"):
            for unit in ("ms", "cpu_ms"):
                assert len(row[f"{method}_{unit}_all"]) == 2
                assert row[f"{method}_{unit}"] == pytest.approx(statistics.median(row[f"{method}_{unit}_all"]))
        assert row["ideal_speedup"] == pytest.approx(1 / row["keys_read"])
        assert row["speedup"] == pytest.approx(row["sdpa_ms"] / row["dga_ms"])
        assert row["share_of_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
        assert row["cpu_speedup"] == pytest.approx(row["sdpa_cpu_ms"] / row["dga_cpu_ms"])
        assert row["cpu_share_of_ideal"] == pytest.approx(row["cpu_speedup"] / row["ideal_speedup"])
        # the keys read are counted, not assumed: a window over the whole sequence reads every key
        if row["config"] == "dense_equivalent":
            assert row["keys_read"] == 1.0
        else:
            assert 0.2 < row["keys_read"] < 0.95

    markdown = (tmp_path / "operator_cpu.md").read_text()
    assert "Inputs: random" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "random" in line]
    assert len(table) == len(saved["results"])
    for line, row in zip(table, saved["results"]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:4] == [row["shape"], "random", str(row["seq_len"]), row["config"]]
        assert cells[4:] == [f"{row['dga_ms']:.1f}", f"{row['layout_ms']:.1f}", f"{row['sdpa_ms']:.1f}",
                             f"{row['speedup']:.2f}", f"{row['keys_read']:.3f}", f"{row['ideal_speedup']:.2f}",
                             f"{row['share_of_ideal']:.2f}", f"{row['cpu_speedup']:.2f}", f"{row['cpu_share_of_ideal']:.2f}"]


def test_a_failing_method_is_recorded_and_the_others_are_timed():
    def broken():
        raise MemoryError("no room")

    timed = operator_bench.time_interleaved({"ok": lambda: None, "broken": broken}, repeats=3)
    assert len(timed["ok"]["ms_all"]) == len(timed["ok"]["cpu_ms_all"]) == 3 and timed["ok"]["ms"] >= 0
    assert timed["broken"]["error"].startswith("MemoryError: no room") and "ms" not in timed["broken"]


def test_configs_by_preset_or_file_and_a_clear_error_otherwise(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"description": "x", "dga": {"group_size": 8, "local_blocks": 4}}))
    configs = operator_bench.named_configs(["paper", str(path)])
    assert list(configs) == ["default", "expand", "paper", "mine"]
    assert configs["mine"].group_size == 8 and configs["mine"].local_blocks == 4
    assert all(config.backend == "torch" for config in configs.values())
    with pytest.raises(ValueError, match="'nothing' is neither a preset"):
        operator_bench.named_configs(["nothing"])


def test_capture_gives_the_attention_inputs_of_one_layer_and_stops_there():
    """What the capture returns is what the layer's attention computes with: SDPA over it, then the layer's
    output projection, equals the attention output of an ordinary forward. Layers after it never run, a
    shorter capture is a prefix of a longer one (the benchmark slices one capture), and the model's attention
    function is restored afterwards."""
    model = make_model("llama", attn_implementation="sdpa", num_hidden_layers=3)
    ids = random_ids(1, 40, seed=3)
    attention = model.model.layers[1].self_attn
    outputs, later_calls = [], []
    hook = attention.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    later = model.model.layers[2].register_forward_hook(lambda *args: later_calls.append(1))
    with torch.no_grad():
        model(ids, use_cache=False)
        assert len(later_calls) == 1
        q, k, v = operator_bench.capture_qkv(model, ids, layer=1)
        assert len(later_calls) == 1 and len(outputs) == 1  # stopped inside layer 1
        assert q.shape == (1, 4, 40, 16) and k.shape == v.shape == (1, 2, 40, 16)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        projected = attention.o_proj(out.transpose(1, 2).reshape(1, 40, -1))
        torch.testing.assert_close(projected, outputs[0], rtol=1e-5, atol=1e-5)

        shorter = operator_bench.capture_qkv(model, ids[:, :24], layer=1)
        for short, full in zip(shorter, (q, k, v)):
            torch.testing.assert_close(short, full[:, :, :24], rtol=1e-5, atol=1e-5)
        model(ids, use_cache=False)  # the ordinary attention again: the whole forward runs
        assert len(later_calls) == 2 and len(outputs) == 2
    with pytest.raises(ValueError, match="layer=3 is out of range"):
        operator_bench.capture_qkv(model, ids, layer=3)
    hook.remove()
    later.remove()
