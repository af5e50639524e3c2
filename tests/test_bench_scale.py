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


def test_bench_scale_longform_and_packing_fields(tmp_path):
    import bench_scale

    (r,) = bench_scale.main(["--shape", "tiny", "--device", "cpu", "--edits", "4", "--steps", "2", "--one-at-a-time", "1",
                             "--one-at-a-time-full-forward", "0", "--prefixes", "1", "--stats-batches", "1",
                             "--stats-batch-size", "2", "--stats-seq", "32", "--longform-tokens", "60",
                             "--longform-requests", "2", "--longform-steps", "2", "--out", str(tmp_path)])
    assert r["packed_rows_supported"] and r["pack_rows"]
    cmp = r["z_s_per_100_edits_packed_vs_padded"]
    assert cmp["packed"] > 0 and cmp["padded"] > 0
    lf = r["longform"][60]
    assert lf["chunks"] >= 2 * 2 and lf["joint"]["s_per_request"] > 0 and lf["autoregressive"]["s_per_request"] > 0


def test_longform_ceiling_separates_vectors_and_update(tiny_model_dir, tmp_path):
    """On the toy model, the chunk vectors raise the teacher-forced accuracy of a new answer, and
    a weakly regularized update with the zero-residual rows keeps most of that gain."""
    import longform_ceiling

    data = tmp_path / "lf.jsonl"
    data.write_text(json.dumps({"question": "Danielle Darrieux lives in", "answer": " Rome. Toko Yasuda plays the piano."}) + "\n")
    out = longform_ceiling.main(["--model", str(tiny_model_dir), "--dataset", str(data), "-n", "1",
                                 "--layer", "2", "--windows", "2", "--steps", "40", "--lr", "0.5", "--clamp", "4",
                                 "--update-layers", "1,2", "--update-lam", "0.01"])
    w = out["windows"][2]
    assert w["vectors_accuracy"] > w["unedited_accuracy"] + 0.2
    on, off = w["updates"]["lam=0.01,context=on"]["accuracy"], w["updates"]["lam=0.01,context=off"]["accuracy"]
    assert on >= w["vectors_accuracy"] - 0.1 and on > off  # the zero-residual rows keep the text in place
