"""lightjson reads and writes what json does, for the plain data start and delete handle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.framework import lightjson

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(plain)
def test_round_trips_like_json(value):
    text = lightjson.dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert lightjson.loads(text) == json.loads(text)


@given(st.text())
def test_arbitrary_text_is_a_value_or_a_value_error(text):
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            lightjson.loads(text)
    else:
        assert lightjson.loads(text) == expected or expected != expected  # NaN


def test_bytes_whitespace_and_trailing_garbage():
    assert lightjson.loads(b' \n{"a": [1, 2.5, true, null]}\r\n') == {"a": [1, 2.5, True, None]}
    with pytest.raises(ValueError, match="extra data"):
        lightjson.loads('{"a": 1} x')
    with pytest.raises(ValueError):
        lightjson.loads("")
    with pytest.raises(TypeError):
        lightjson.dumps({1, 2})


def test_it_imports_neither_json_nor_re():
    code = "import sys, shim.framework.lightjson as j; j.loads('{\"a\":[1]}'); print('json' in sys.modules, 're' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
