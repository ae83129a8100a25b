import pytest
import torch

from perflow_core.cfg_schedule import cfg_at, parse_cfg_list, ramp_cfg_scales, window_cfg_scales


def test_lists_constants_and_ramps():
    assert window_cfg_scales(parse_cfg_list("7, 5,3"), 4) == [7.0, 5.0, 3.0, 3.0]
    assert window_cfg_scales(parse_cfg_list("4.5"), 4) == [4.5] * 4
    assert ramp_cfg_scales(7.0, 1.0, 4) == [7.0, 5.0, 3.0, 1.0]
    assert ramp_cfg_scales(3.0, 1.0, 1) == [3.0]


def test_scale_follows_the_window_of_t():
    scales = [7.0, 1.0, 1.0, 2.0]
    got = [cfg_at(scales, torch.tensor([t, t])) for t in (1.0, 0.875, 0.75, 0.3, 0.25, 0.01)]
    assert got == [7.0, 7.0, 1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("text", ["", "a,b", "7,,x", "-1", "7,5,3,1,1"])
def test_bad_lists_are_refused(text):
    with pytest.raises(ValueError, match="CFG"):
        window_cfg_scales(parse_cfg_list(text), 4)
