"""benchmarks/text_trim.py runs end to end: every distribution, objective and trimming mode gives a row."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_text_trim_benchmark_smoke(monkeypatch, capsys, one_thread):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import text_trim

    argv = ["text_trim.py", "--model", "ALIP-Tiny", "--batch", "4", "--steps", "1", "--warmup", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--dists", "abc"])
    text_trim.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    header, rows = lines[0], lines[1:]
    assert header["dist_b_raw_median"] == 16 and 0.1 < header["dist_b_raw_share_77"] < 0.2  # as documented
    assert len(rows) == 3 * 2 * 3  # distributions x objectives x trimming modes
    assert {(r["dist"], r["objective"], r["text_trim"]) for r in rows} == {
        (d, o, m) for d in "abc" for o in ("alip", "clip") for m in ("off", "batch", "buckets")
    }
    for r in rows:
        assert r["model"] == "ALIP-Tiny" and r["batch"] == 4
        assert r["ms_per_step"] > 0 and r["gflop_per_sample"] > 0 and r["time_over_clip_off"] > 0
        assert (r["alip_over_clip_same_mode"] is None) == (r["objective"] == "clip")
    flops = {(r["dist"], r["objective"], r["text_trim"]): r["gflop_per_sample"] for r in rows}
    for objective in ("alip", "clip"):
        # (a): every text is 77 tokens, trimming has nothing to cut; (b), (c): it computes less
        assert flops[("a", objective, "buckets")] == flops[("a", objective, "off")]
        for dist in "bc":
            assert flops[(dist, objective, "buckets")] < flops[(dist, objective, "off")]
            assert flops[(dist, objective, "batch")] <= flops[(dist, objective, "off")]
    assert flops[("a", "alip", "off")] > flops[("a", "clip", "off")]  # ALIP runs the text tower twice
