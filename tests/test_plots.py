"""The figures: files written, bad input refused."""

import pytest

from functional_meta.plots import plot_validation_curves

pytest.importorskip("matplotlib")


def test_validation_curves_draw_one_panel_per_setting(tmp_path):
    panels = {
        "5-way 1-shot": {"maml": ([1.0, 2.0], [0.8, 0.9]), "anil": ([1.5, 3.0], [0.7, 0.85])},
        "20-way 1-shot": {"maml": ([2.0, 4.0], [0.5, 0.7])},
    }
    path = plot_validation_curves(panels, tmp_path / "curves.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_curves_need_a_panel(tmp_path):
    with pytest.raises(ValueError, match="panels is empty"):
        plot_validation_curves({}, tmp_path / "none.png")
