"""`make demo` runs the main job end to end on the bundled model."""

from __future__ import annotations


def test_demo_runs(tmp_path, capsys):
    from hbc.demo import run

    assert run(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "demo: OK" in out and "bit-exact" in out
    assert (tmp_path / "demo_cnn.hbir").exists() and (tmp_path / "demo_cnn.O3.hbir").exists()
