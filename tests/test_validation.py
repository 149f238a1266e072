"""The contract's input rules, one function at a time."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from werkzeug.datastructures import MultiDict

from chatapi import validation
from chatapi.errors import ApiError


def code_of(call, *args, **kwargs) -> str:
    with pytest.raises(ApiError) as raised:
        call(*args, **kwargs)
    return raised.value.code


@pytest.mark.parametrize("name", ["abc", "Alice", "a.b-c_d", "0day", "x" * 32, "ABC"])
def test_usernames_accepted_and_lower_cased(name: str) -> None:
    assert validation.username(name) == name.lower()


@pytest.mark.parametrize(
    "name", ["ab", "x" * 33, "_abc", ".abc", "-abc", "al ice", "alice!", "ålice", "\u212aelvin", "abc\n", ""]
)
def test_bad_usernames_refused(name: str) -> None:
    assert code_of(validation.username, name) == "invalid_username"


@pytest.mark.parametrize("password", ["12345678", "x" * 1024, "pässwörd", "emoji🙂🙂🙂🙂🙂🙂🙂"])
def test_passwords_accepted(password: str) -> None:
    assert validation.password(password) == password


@pytest.mark.parametrize("password", ["1234567", "x" * 1025, "", "abcdefg\ud800"])
def test_bad_passwords_refused(password: str) -> None:
    assert code_of(validation.password, password) == "invalid_password"


@pytest.mark.parametrize(
    "text",
    ["hi", "x" * 4000, "🙂" * 4000, "tab\there", "line\nbreak", "cr\r\n", " padded ", "<img src=x onerror=alert(1)>"],
)
def test_texts_accepted_exactly(text: str) -> None:
    assert validation.message_text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "x" * 4001,
        "🙂" * 4001,
        "   ",
        "\n\t\r ",
        "\u00a0\u2003",
        "bell\x07",
        "del\x7f",
        "c1\x85",
        "nul\x00",
        "\ud800",
    ],
)
def test_bad_texts_refused(text: str) -> None:
    assert code_of(validation.message_text, text) == "invalid_text"


@pytest.mark.parametrize("client_id", ["a", "x" * 64, "A-z.0_9:x", "2f1e6a0c-0000-4000-8000-000000000000"])
def test_client_ids_accepted(client_id: str) -> None:
    assert validation.client_id(client_id) == client_id


@pytest.mark.parametrize("client_id", ["", "x" * 65, "has space", "slash/", "é"])
def test_bad_client_ids_refused(client_id: str) -> None:
    assert code_of(validation.client_id, client_id) == "invalid_client_id"


def test_null_client_id_is_absent() -> None:
    assert validation.client_id(None) is None


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "abc", "+3", " 3", "0x10", "1e3"])
def test_bad_integer_parameters_refused(raw: str) -> None:
    assert code_of(validation.int_param, MultiDict({"after": raw}), "after", low=0) == "invalid_parameter"


def test_huge_integer_parameter_is_beyond_any_head() -> None:
    assert validation.int_param(MultiDict({"after": "9" * 5000}), "after", low=0) >= 10**18


@pytest.mark.parametrize("raw", ["0", "1001", "", "-5"])
def test_limit_must_be_1_to_1000(raw: str) -> None:
    assert code_of(validation.limit_param, MultiDict({"limit": raw})) == "invalid_parameter"


@pytest.mark.parametrize(("raw", "seconds"), [("0", 0), ("2.5", 2.5), (".5", 0.5), ("60", 60), ("61", 60), ("999", 60)])
def test_timeouts(raw: str, seconds: float) -> None:
    assert validation.timeout_param(MultiDict({"timeout": raw}), 25, 60) == seconds


@pytest.mark.parametrize("raw", ["", "-1", "abc", "nan", "inf", "1e3", "1,5"])
def test_bad_timeouts_refused(raw: str) -> None:
    assert code_of(validation.timeout_param, MultiDict({"timeout": raw}), 25, 60) == "invalid_parameter"


def _twice(name: str) -> MultiDict:
    return MultiDict([(name, "1"), (name, "2")])


def test_a_parameter_given_twice_is_refused() -> None:
    """`after=1&after=2`: answering either would guess what the client meant."""
    assert code_of(validation.int_param, _twice("after"), "after", low=0) == "invalid_parameter"
    assert code_of(validation.limit_param, _twice("limit")) == "invalid_parameter"
    assert code_of(validation.timeout_param, _twice("timeout"), 25, 60) == "invalid_parameter"


def test_default_timeout_is_25_seconds() -> None:
    assert validation.timeout_param(MultiDict({}), 25, 60) == 25


def test_the_refused_characters_are_exactly_cc_but_tab_newline_return_and_cs() -> None:
    """The contract's rule, checked against unicodedata for every code point."""
    for code_point in range(sys.maxunicode + 1):
        char = chr(code_point)
        category = unicodedata.category(char)
        refused = (category == "Cc" and char not in "\t\n\r") or category == "Cs"
        try:
            validation.message_text("a" + char)
        except ApiError as error:
            assert refused and error.code == "invalid_text", hex(code_point)
        else:
            assert not refused, hex(code_point)
