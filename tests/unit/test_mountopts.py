"""unionfs.mountopts: the one ``-o``/``lowerdir=`` grammar, for the mount program and for reading other daemons."""

from __future__ import annotations

import pytest

from unionfs.mountopts import escape_path, option_values, split_lowerdir, split_options, unescape


def test_split_options_honours_escaped_commas_and_quotes_and_keeps_other_escapes() -> None:
    text = 'lowerdir=/a\\:b:/c,upperdir=/u\\,v,context="s0:c1,c2",,ro'
    assert split_options(text) == ["lowerdir=/a\\:b:/c", "upperdir=/u,v", 'context="s0:c1,c2"', "ro"]


def test_option_values_is_a_name_table_where_a_later_value_wins() -> None:
    assert option_values("a=1,b,c=x\\,y,a=2") == {"a": "2", "b": "", "c": "x,y"}


def test_split_lowerdir_unescapes_each_name_and_keeps_empty_ones_for_the_caller() -> None:
    assert split_lowerdir("/top:/mid\\:dle:/b\\\\s") == ["/top", "/mid:dle", "/b\\s"]
    assert split_lowerdir("/a::/b") == ["/a", "", "/b"]


@pytest.mark.parametrize("path", ["/plain", "/with:colon", "/with,comma", '/with"quote', "/back\\slash", "/a\\:b,c"])
def test_escape_path_reads_back_unchanged_through_every_reader(path: str) -> None:
    escaped = escape_path(path)
    assert unescape(escaped) == path
    assert split_lowerdir(escaped + ":" + escaped) == [path, path]
    values = option_values(f"upperdir={escaped},lowerdir={escaped}:/x")
    assert unescape(values["upperdir"]) == path
    assert split_lowerdir(values["lowerdir"]) == [path, "/x"]
