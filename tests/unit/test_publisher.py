"""`mayhem publish --file`: every line is checked before the first message is published."""

from __future__ import annotations

import io

import pytest

from mayhem.publisher import InputError, check_jsonl


def test_a_file_is_checked_then_read_line_by_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  [1, 2]  \r\n"text"\n')
    count, bodies = check_jsonl(str(path))
    assert count == 3
    assert list(bodies) == [b'{"a": 1}', b"[1, 2]", b'"text"']


def test_standard_input_is_checked_then_read(tmp_path):
    count, bodies = check_jsonl("-", io.BytesIO(b'{"n": 1}\n{"n": 2}\n'))
    assert count == 2
    assert list(bodies) == [b'{"n": 1}', b'{"n": 2}']


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"{bad", "not valid JSON"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": 1e400}', "too large"),
        (b'"\xff"', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_handed_out(line, why):
    """The daemon would dead-letter such a body: refused before anything is published."""
    stdin = io.BytesIO(b'{"ok": 1}\n\n' + line + b'\n{"ok": 2}\n')
    with pytest.raises(InputError, match=why) as info:
        check_jsonl("-", stdin)
    assert str(info.value).startswith("<stdin>:3: ")
    assert str(info.value).endswith("; nothing was published")
    assert "\n" not in str(info.value)


def test_an_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^cannot read .*nope\.jsonl: No such file"):
        check_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="Is a directory"):
        check_jsonl(str(tmp_path))


def test_lines_added_after_the_check_are_not_published(tmp_path):
    """The file is read twice: a line appended in between was never checked, so it is left."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"1\n2\n")
    count, bodies = check_jsonl(str(path))
    with path.open("ab") as out:
        out.write(b"{not checked\n")
    assert count == 2
    assert list(bodies) == [b"1", b"2"]
