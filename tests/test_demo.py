"""`make demo` runs the main job end to end on the bundled model."""

from __future__ import annotations


def test_demo_runs(tmp_path, capsys):
    from hbc.demo import run

    assert run(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "demo: OK" in out and "bit-exact" in out
    assert (tmp_path / "demo_cnn.hbir").exists() and (tmp_path / "demo_cnn.O3.hbir").exists()
    for name in ("demo_cnn.hbm", "demo_cnn.perf.json", "demo_cnn.perf.html", "run/logits.npy"):
        assert (tmp_path / name).exists(), name
    assert "MATCH: every output bit-exact" in out and "model_checker: mobilenet_v2" in out
