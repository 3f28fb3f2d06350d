"""Window maths: DICOM LINEAR windowing, presets, min-max, inversion."""

from __future__ import annotations

import numpy as np
import pytest

from tinyllava_med.imaging import WINDOW_PRESETS, ImagingError, Window, apply_window


def test_presets_are_the_usual_ct_windows():
    assert WINDOW_PRESETS["soft-tissue"][:2] == (40, 400)
    assert WINDOW_PRESETS["lung"][:2] == (-600, 1500)
    assert WINDOW_PRESETS["bone"][:2] == (400, 1800)
    assert WINDOW_PRESETS["brain"][:2] == (40, 80)


def test_linear_window_maps_edges_and_centre():
    values = np.array([[-1000.0, -160.5, 40.0, 240.0, 3000.0]])
    pixels = np.asarray(apply_window(values, (40, 400)))
    assert pixels[0, 0] == 0 and pixels[0, 1] == 0
    assert abs(int(pixels[0, 2]) - 128) <= 1
    assert pixels[0, 3] == 255 and pixels[0, 4] == 255


def test_preset_name_tuple_and_window_agree():
    values = np.linspace(-1200, 1200, 100).reshape(10, 10)
    by_name = np.asarray(apply_window(values, "lung"))
    by_pair = np.asarray(apply_window(values, (-600, 1500)))
    by_window = np.asarray(apply_window(values, Window(-600, 1500)))
    assert np.array_equal(by_name, by_pair) and np.array_equal(by_pair, by_window)


def test_minmax_and_inversion():
    values = np.array([[5.0, 10.0, 15.0]])
    assert np.asarray(apply_window(values, None)).tolist() == [[0, 128, 255]]
    assert np.asarray(apply_window(values, None, invert=True)).tolist() == [[255, 127, 0]]
    assert np.asarray(apply_window(np.full((2, 2), 7.0), None)).max() == 0


def test_sigmoid_and_linear_exact():
    values = np.array([[0.0, 100.0, 200.0]])
    sigmoid = np.asarray(apply_window(values, Window(100, 50, "SIGMOID")))[0]
    exact = np.asarray(apply_window(values, Window(100, 200, "LINEAR_EXACT")))[0]
    assert sigmoid[0] < 5 and sigmoid[1] in (127, 128) and sigmoid[2] > 250
    assert exact.tolist() == [0, 128, 255]


def test_unknown_preset_is_bad_window():
    with pytest.raises(ImagingError) as info:
        apply_window(np.zeros((2, 2)), "default")
    assert info.value.code == "bad_window"
