"""Numbers are read one way everywhere: plain ASCII decimal notation, finite values, errors that quote the text."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perflow_core.cfg_schedule import parse_cfg_list, ramp_cfg_scales, window_cfg_scales
from perflow_core.delta_format import DeltaMetadata
from perflow_core.number_parsing import finite, parse_float, parse_int

PROPERTY = settings(max_examples=200, deadline=None)
ASCII_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
NOT_PLAIN = ["٤", "４", "²", "7,,1", "1_0", " 1e400", "1e400", "nan", "NaN", "inf", "-inf", "Infinity", "0x10", "1 0"]


@pytest.mark.parametrize("text", NOT_PLAIN)
def test_parse_float_refuses_what_python_float_accepts(text):
    with pytest.raises(ValueError) as e:
        parse_float(text, "a value")
    assert repr(text.strip()) in str(e.value) or repr(text) in str(e.value)


@pytest.mark.parametrize("text", ["٤", "４", "²", "1_0", " 1", "1 ", "+1", "-1", "1.0", ""])
def test_parse_int_refuses_everything_but_ascii_digits(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_int(text, "a count")


@PROPERTY
@given(st.text(max_size=12))
def test_parse_float_accepts_exactly_plain_finite_decimals(text):
    plain = ASCII_FLOAT.fullmatch(text) is not None and math.isfinite(float(text))
    try:
        value = parse_float(text, "x")
    except ValueError as e:
        assert not plain and repr(text) in str(e)
        return
    assert plain and value == float(text)


@PROPERTY
@given(st.text(max_size=8))
def test_parse_int_accepts_exactly_ascii_digits(text):
    try:
        value = parse_int(text, "x")
    except ValueError as e:
        assert not (text and all(c in "0123456789" for c in text)) and repr(text) in str(e)
        return
    assert text and all(c in "0123456789" for c in text) and value == int(text)


@PROPERTY
@given(st.floats(0, 100, allow_nan=False).map(lambda v: round(v, 3)), st.sampled_from([",", ";", ", ", " , "]))
def test_cfg_list_round_trips_plain_numbers(value, sep):
    assert parse_cfg_list(sep.join([repr(value), "1"])) == [value, 1.0]


@pytest.mark.parametrize("text", NOT_PLAIN + ["7,", ",7", "7,5,", "101", "-1", "  "])
def test_cfg_list_refuses_with_the_text_quoted(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_cfg_list(text)


@PROPERTY
@given(st.text(max_size=16))
def test_cfg_list_never_returns_a_non_finite_or_out_of_range_scale(text):
    try:
        values = parse_cfg_list(text)
    except ValueError as e:
        assert repr(text) in str(e)
        return
    assert values and all(math.isfinite(v) and 0 <= v <= 100 for v in values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -0.5, 100.5, True])
def test_ramp_endpoints_and_listed_scales_are_checked(bad):
    with pytest.raises(ValueError, match="ramp_start"):
        ramp_cfg_scales(bad, 1.0, 4)
    with pytest.raises(ValueError, match="ramp_end"):
        ramp_cfg_scales(7.0, bad, 4)
    with pytest.raises(ValueError, match="CFG scale"):
        window_cfg_scales([bad], 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", None, True])
def test_finite_refuses_nan_inf_and_non_numbers(bad):
    with pytest.raises(ValueError, match="strength must be a finite number"):
        finite(bad, "strength")


@pytest.mark.parametrize("key", ["num_windows", "steps_trained"])
@pytest.mark.parametrize("text", ["٤", "４", "²", "1_0", " 4", "4.0", "+4"])
def test_metadata_integers_are_plain_ascii(key, text):
    meta = DeltaMetadata("ddim_eps", 4, "sdxl", "ab" * 32).to_metadata()
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        DeltaMetadata.from_metadata({**meta, key: text})


@pytest.mark.parametrize("text", ["nan", "inf", "1e400", "٤", "-1", "1_0"])
def test_metadata_cfg_scale_is_a_plain_finite_number(text):
    meta = DeltaMetadata("ddim_eps", 4, "sdxl", "ab" * 32, cfg_mode="fixed", cfg_scale=4.5).to_metadata()
    assert DeltaMetadata.from_metadata(meta).cfg_scale == 4.5
    with pytest.raises(ValueError, match="cfg_scale"):
        DeltaMetadata.from_metadata({**meta, "cfg_scale": text})
    with pytest.raises(ValueError, match="cfg_fixed|cfg_scale"):
        DeltaMetadata.from_metadata({**meta, "cfg_mode": f"cfg_fixed {text}"} | {"cfg_scale": "1"})
