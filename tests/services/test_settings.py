"""The controls' values as SamplingParams: a seed typed into a seed box (text) is that seed; an empty box a fresh
seed per run; anything else is refused by the field's name (review of issue 21: a typed seed was refused)."""

from __future__ import annotations

import pytest

from qdemo.services import settings


@pytest.mark.parametrize("typed,seed", [("42", 42), (" 7 ", 7), ("", None), ("  ", None), (None, None), (5, 5),
                                        ("9223372036854775807", 2 ** 63 - 1)])
def test_a_typed_seed_is_that_seed(typed, seed):
    assert settings.to_params({"mode": "sample", "seed": typed}).seed == seed


@pytest.mark.parametrize("typed", ["abc", "-1", "1.5", "４２", True, "1e3"])
def test_a_seed_that_is_not_a_whole_number_names_the_field(typed):
    with pytest.raises(ValueError, match="seed"):
        settings.to_params({"mode": "sample", "seed": typed})


def test_number_boxes_take_numbers_not_text():
    assert settings.whole_number(8.0, "samples") == 8
    for bad in ("8", True, 2.5, float("inf")):
        with pytest.raises(ValueError, match="samples must be a whole number"):
            settings.whole_number(bad, "samples")
