"""The scale benchmark's CPU path (``--shape tiny``) runs end to end and reports every field the
GPU runs are read for."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_bench_scale_tiny_runs_and_reports(tmp_path, capsys):
    import bench_scale

    (r,) = bench_scale.main(["--shape", "tiny", "--device", "cpu", "--edits", "6", "--steps", "3", "--one-at-a-time", "2",
                             "--prefixes", "2", "--stats-batches", "2", "--stats-batch-size", "2", "--stats-seq", "64",
                             "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("tiny_*.json")).read_text())
    assert saved["shape"] == "tiny" and saved["edits"] == 6
    for key in ("s_per_100_edits", "s_per_100_edits_one_at_a_time", "stats_tokens_per_s", "stats_roofline_fraction"):
        assert saved[key] > 0, key
    assert set(saved["phases_s_per_100_edits"]) == {"z", "keys", "solve", "apply", "state"}
    # phases add up to the batch time
    assert abs(sum(saved["phases_s_per_100_edits"].values()) - saved["s_per_100_edits"]) < 1e-6
    # the fast z path computes what full forwards compute (float32 on CPU)
    assert saved["delta_max_rel_diff_fast_vs_full_forward"] < 1e-3
    assert "| tiny |" in capsys.readouterr().out
