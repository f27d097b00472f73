"""The fuse-overlayfs command line: parsing into MountConfig, and the FUSE options a config turns into.

Pure parsing, no filesystem: paths need not exist.
"""

from __future__ import annotations

import os.path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mountd.options import (
    FUSE_DEFAULTS,
    IGNORED_FLAGS,
    IGNORED_KEYS,
    ROOT_FUSE_DEFAULTS,
    UNSUPPORTED_KEYS,
    Action,
    MountConfig,
    OptionError,
    fuse_kwargs,
    help_text,
    parse_argv,
    parse_mappings,
    unsupported_fuse_options,
)
from unionfs.fs.idmap import IdMap, IdRange
from unionfs.mountopts import escape_path

RW = "lowerdir=/l1:/l2,upperdir=/u,workdir=/w"


def parse(*argv: str, cwd: str = "/cwd") -> MountConfig:
    config = parse_argv(list(argv), cwd=cwd)
    assert isinstance(config, MountConfig)
    return config


def error_of(*argv: str) -> str:
    with pytest.raises(OptionError) as info:
        parse_argv(list(argv), cwd="/cwd")
    message = str(info.value)
    assert "\n" not in message
    return message


# -- positional arguments and flags -------------------------------------------------------------------------

def test_mountpoint_alone_and_the_layers() -> None:
    config = parse("-o", RW, "/mnt")
    assert config.mountpoint == "/mnt"
    assert config.source is None
    assert config.lowers == ("/l1", "/l2")
    assert (config.upper, config.work) == ("/u", "/w")
    assert not config.read_only


def test_source_then_mountpoint() -> None:
    config = parse("overlay", "/mnt", "-o", RW)
    assert (config.source, config.mountpoint) == ("overlay", "/mnt")


def test_options_may_come_before_or_after_the_positional_arguments() -> None:
    assert parse("-o", RW, "/mnt") == parse("/mnt", "-o", RW)


def test_attached_o_and_double_dash() -> None:
    config = parse("-o" + RW, "--", "-strange-mnt")
    assert config.lowers == ("/l1", "/l2")
    assert config.mountpoint == "/cwd/-strange-mnt"


def test_relative_paths_are_made_absolute_against_cwd() -> None:
    config = parse("-o", "lowerdir=l/A:../B,upperdir=diff,workdir=./work", "merged", cwd="/store/overlay")
    assert config.lowers == ("/store/overlay/l/A", "/store/B")
    assert (config.upper, config.work) == ("/store/overlay/diff", "/store/overlay/work")
    assert config.mountpoint == "/store/overlay/merged"


def test_flags_f_d_s() -> None:
    assert parse("-o", RW, "/m", "-f").foreground
    debug = parse("-d", "-o", RW, "/m")
    assert debug.debug and debug.foreground  # -d implies -f, as with libfuse
    assert parse("-s", "-o", RW, "/m").single_threaded
    assert parse("-o", RW + ",threaded=0", "/m").single_threaded
    assert parse("-o", RW + ",debug", "/m").debug


def test_defaults() -> None:
    config = parse("-o", RW, "/m")
    assert not (config.foreground or config.debug or config.single_threaded or config.volatile)
    assert config.whiteout == "auto"
    assert not config.maps_ids
    assert config.fuse_options == ()
    assert config.ignored == ()


def test_config_is_frozen() -> None:
    config = parse("-o", RW, "/m")
    with pytest.raises(AttributeError):
        config.mountpoint = "/elsewhere"  # type: ignore[misc]
    assert config.mountpoint == "/m"


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["/m", "-o", "bogus", "-h"], ["-V", "-h"]])
def test_help_wins_over_everything(argv: list[str]) -> None:
    assert parse_argv(argv) is Action.HELP


@pytest.mark.parametrize("argv", [["-V"], ["--version"], ["-o", "nonsense", "--version"]])
def test_version(argv: list[str]) -> None:
    assert parse_argv(argv) is Action.VERSION


@pytest.mark.parametrize(("argv", "message"), [
    (["-o", RW], "missing MOUNTPOINT"),
    (["-o", RW, "a", "b", "c"], "too many arguments: a b c"),
    (["/m"], "missing -o lowerdir=DIR[:DIR…]"),
    (["/m", "-o"], "option -o needs a value"),
    (["/m", "-o", RW, "-x"], "unknown option '-x'"),
    (["/m", "-o", RW, "--frobnicate"], "unknown option '--frobnicate'"),
    (["/m", "-o", "lowerdir=/l,upperdir=/u"], "upperdir and workdir must be given together"),
    (["/m", "-o", "lowerdir=/l,workdir=/w"], "upperdir and workdir must be given together"),
])
def test_command_line_errors(argv: list[str], message: str) -> None:
    assert error_of(*argv) == message


# -- -o lists: merging and escapes --------------------------------------------------------------------------

def test_several_o_merge_and_a_later_value_wins() -> None:
    config = parse("-o", "lowerdir=/old", "/m", "-o", "upperdir=/u,workdir=/w", "-o", "lowerdir=/new")
    assert config.lowers == ("/new",)
    assert (config.upper, config.work) == ("/u", "/w")


def test_empty_items_in_an_o_list_are_skipped() -> None:
    assert parse("-o", ",," + RW + ",", "/m").lowers == ("/l1", "/l2")


def test_escaped_colon_stays_inside_one_lower() -> None:
    assert parse("-o", r"lowerdir=/a\:b:/c", "/m").lowers == ("/a:b", "/c")


def test_escaped_comma_stays_inside_one_value() -> None:
    config = parse("-o", r"lowerdir=/a\,b:/c,upperdir=/u\,v,workdir=/w", "/m")
    assert config.lowers == ("/a,b", "/c")
    assert config.upper == "/u,v"


def test_commas_inside_double_quotes_do_not_split() -> None:
    """containers/storage passes an SELinux label as ``context="…:c1,c2"``."""
    option = 'context="system_u:object_r:container_file_t:s0:c1,c2"'
    config = parse("-o", f"{RW},{option},volatile", "/m")
    assert config.ignored == (option,)
    assert config.volatile


def test_an_escaped_quote_is_a_plain_character() -> None:
    assert parse("-o", r'lowerdir=/a\"b,upperdir=/u,workdir=/w', "/m").lowers == ('/a"b',)


def test_escaped_backslash() -> None:
    assert parse("-o", r"lowerdir=/a\\:/b", "/m").lowers == ("/a\\", "/b")


@pytest.mark.parametrize("lowerdir", ["lowerdir=", "lowerdir=/a::/b", "lowerdir=/a:", "lowerdir=:/a"])
def test_empty_lower_names_are_refused(lowerdir: str) -> None:
    assert "empty directory name" in error_of("-o", lowerdir, "/m")


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
                        min_size=1).map(lambda s: "/" + s), min_size=1, max_size=4))
def test_escape_path_round_trips_through_the_parser(lowers: list[str]) -> None:
    """What ``unionfs mount --lower`` writes, the parser reads back unchanged."""
    option = "lowerdir=" + ":".join(escape_path(p) for p in lowers)
    config = parse("-o", option, "/m", cwd="/")
    assert config.lowers == tuple(_normalized(p) for p in lowers)


def _normalized(path: str) -> str:
    return os.path.normpath(path)


# -- union options ------------------------------------------------------------------------------------------

def test_no_upperdir_is_read_only() -> None:
    config = parse("-o", "lowerdir=/l", "/m")
    assert config.read_only
    assert config.upper is None and config.work is None


def test_ro_makes_it_read_only_and_rw_undoes_it() -> None:
    assert parse("-o", RW + ",ro", "/m").read_only
    assert not parse("-o", RW + ",ro,rw", "/m").read_only


@pytest.mark.parametrize(("options", "volatile"), [("volatile", True), ("fsync=0", True), ("fsync=1", False),
                                                   ("volatile,fsync=1", False)])
def test_volatile(options: str, volatile: bool) -> None:
    assert parse("-o", RW + "," + options, "/m").volatile is volatile


def test_mappings_skip_empty_fields_as_container_storage_writes_them() -> None:
    config = parse("-o", RW + ",uidmapping=:0:100000:65536,gidmapping=:0:100000:65536", "/m")
    assert [(m.container_id, m.host_id, m.size) for m in config.uid_mappings] == [(0, 100000, 65536)]
    assert [(m.container_id, m.host_id, m.size) for m in config.gid_mappings] == [(0, 100000, 65536)]


@pytest.mark.parametrize(("options", "on"), [("", False), ("writeback_cache", True), ("writeback_cache=0", False),
                                             ("writeback=1", True), ("writeback=0", False),
                                             ("writeback_cache,writeback=0", False)])
def test_writeback_cache(options: str, on: bool) -> None:
    extra = "," + options if options else ""
    assert parse("-o", RW + extra, "/m").writeback_cache is on


@pytest.mark.parametrize(("options", "mode"), [("", "1"), ("readdirplus", "1"), ("readdirplus=1", "1"),
                                               ("readdirplus=0", "0"), ("readdirplus=auto", "auto")])
def test_readdirplus(options: str, mode: str) -> None:
    extra = "," + options if options else ""
    assert parse("-o", RW + extra, "/m").readdirplus == mode


@pytest.mark.parametrize(("options", "on"), [("", True), ("dir_cache=on", True), ("dir_cache=1", True),
                                             ("dir_cache=off", False), ("dir_cache=0", False)])
def test_dir_cache(options: str, on: bool) -> None:
    extra = "," + options if options else ""
    assert parse("-o", RW + extra, "/m").dir_cache is on


def test_dir_cache_takes_only_on_or_off() -> None:
    assert error_of("-o", RW + ",dir_cache=maybe", "/m") == "dir_cache=maybe: expected on or off"


def test_dir_cache_reaches_the_protocol_settings() -> None:
    from mountd.lowlevel.frontend import settings_from

    assert settings_from({}, writeback_cache=False, readdirplus="1", posix_acl=False).dir_cache is True
    assert settings_from({}, writeback_cache=False, readdirplus="1", posix_acl=False,
                         dir_cache=False).dir_cache is False


def test_noacl() -> None:
    assert parse("-o", RW, "/m").acl is True
    assert parse("-o", RW + ",noacl", "/m").acl is False
    with pytest.raises(OptionError, match="noacl"):
        parse("-o", RW + ",noacl=1", "/m")


def test_cache_entries() -> None:
    assert parse("-o", RW, "/m").cache_entries == 1_000_000
    assert parse("-o", RW + ",cache_entries=20000", "/m").cache_entries == 20000


@pytest.mark.parametrize("value", ["", "many", "999", "-1"])
def test_cache_entries_needs_a_count_of_at_least_1000(value: str) -> None:
    with pytest.raises(OptionError, match="cache_entries"):
        parse("-o", RW + f",cache_entries={value}", "/m")


def test_readdirplus_takes_only_zero_one_or_auto() -> None:
    with pytest.raises(OptionError, match="readdirplus=maybe: expected 0, 1 or auto"):
        parse("-o", RW + ",readdirplus=maybe", "/m")


@pytest.mark.parametrize("fmt", ["auto", "kernel", "oci"])
def test_whiteout_formats(fmt: str) -> None:
    assert parse("-o", f"{RW},whiteout={fmt}", "/m").whiteout == fmt


@pytest.mark.parametrize("mode", ["on", "follow", "nofollow", "off"])
def test_redirect_dir_modes(mode: str) -> None:
    assert parse("-o", f"{RW},redirect_dir={mode}", "/m").redirect_dir == mode


def test_redirect_dir_is_on_by_default_and_a_later_value_wins() -> None:
    assert parse("-o", RW, "/m").redirect_dir == "on"
    assert parse("-o", f"{RW},redirect_dir=off", "-o", "redirect_dir=follow", "/m").redirect_dir == "follow"


@pytest.mark.parametrize(("raw", "mode"), [("on", "on"), ("all", "all"), ("off", "off"), ("1", "on"), ("0", "off")])
def test_passthrough_modes(raw: str, mode: str) -> None:
    assert parse("-o", f"{RW},passthrough={raw}", "/m").passthrough == mode


def test_passthrough_is_on_by_default_and_bogus_values_are_refused() -> None:
    assert parse("-o", RW, "/m").passthrough == "on"
    assert error_of("-o", RW + ",passthrough=yes", "/m") == "passthrough=yes: expected one of on, off, all"


def test_redirect_dir_bogus() -> None:
    assert error_of("-o", RW + ",redirect_dir=yes", "/m") == \
        "redirect_dir=yes: expected one of on, follow, nofollow, off"


@pytest.mark.parametrize("mode", ["on", "off"])
def test_index_modes(mode: str) -> None:
    assert parse("-o", f"{RW},index={mode}", "/m").inode_index == mode


def test_index_is_off_by_default_and_a_later_value_wins() -> None:
    assert parse("-o", RW, "/m").inode_index == "off"
    assert parse("-o", f"{RW},index=on", "-o", "index=off", "/m").inode_index == "off"


def test_index_bogus() -> None:
    assert error_of("-o", RW + ",index=yes", "/m") == "index=yes: expected one of on, off"


def test_whiteout_bogus() -> None:
    assert error_of("-o", RW + ",whiteout=bogus", "/m") == "whiteout=bogus: expected one of auto, kernel, oci"


@pytest.mark.parametrize(("option", "message"), [
    ("volatile=1", "option 'volatile' takes no value"),
    ("ro=yes", "option 'ro' takes no value"),
    ("fsync=2", "fsync=2: expected 0 or 1"),
    ("threaded", "option 'threaded' needs a value (threaded=…)"),
    ("upperdir=", "upperdir: empty directory name"),
    ("lowerdir", "option 'lowerdir' needs a value (lowerdir=…)"),
])
def test_union_option_values(option: str, message: str) -> None:
    assert error_of("-o", RW + "," + option, "/m") == message


def test_timeout_sets_the_three_kernel_cache_times() -> None:
    config = parse("-o", RW + ",timeout=2.5", "/m")
    assert dict(config.fuse_options) == {"attr_timeout": 2.5, "entry_timeout": 2.5, "negative_timeout": 2.5}


# -- uid/gid mappings and squashing -------------------------------------------------------------------------

def test_mappings_in_fuse_overlayfs_syntax() -> None:
    config = parse("-o", RW + ",uidmapping=0:1000:1:1:100000:65536,gidmapping=0:2000:10", "/m")
    assert config.uid_mappings == (IdRange(0, 1000, 1), IdRange(1, 100000, 65536))
    assert config.gid_mappings == (IdRange(0, 2000, 10),)
    assert config.maps_ids


def test_the_config_gives_the_core_one_id_map() -> None:
    """The parsed ranges are the core's own :class:`IdRange`; squash_to_root squashes both ids to 0."""
    config = parse("-o", RW + ",uidmapping=1:100000:65536,squash_to_root", "/m")
    idmap = config.id_map()
    assert idmap == IdMap(uids=(IdRange(1, 100000, 65536),), gids=(), squash_uid=0, squash_gid=0)
    mapped = parse("-o", RW + ",uidmapping=1:100000:65536", "/m").id_map()
    assert mapped is not None and mapped.shown(1, 7) == (100000, 7) and mapped.stored(165535, 7) == (65536, 7)
    assert parse("-o", RW, "/m").id_map() is None


@pytest.mark.parametrize(("text", "problem"), [
    ("0:1000", "expected CONTAINERID:HOSTID:SIZE"),
    ("0:1000:1:5", "expected CONTAINERID:HOSTID:SIZE"),
    ("0:x:1", "expected CONTAINERID:HOSTID:SIZE"),
    ("-1:0:1", "expected CONTAINERID:HOSTID:SIZE"),
    ("", "expected CONTAINERID:HOSTID:SIZE"),
    ("0:1000:0", "a range of size 0"),
    ("0:4294967290:10", "ids beyond 4294967294"),
    ("0:1000:10:5:2000:10", "ranges overlap"),      # container ids 0-9 and 5-14
    ("0:1000:10:20:1005:10", "ranges overlap"),     # host ids 1000-1009 and 1005-1014
])
def test_mapping_errors(text: str, problem: str) -> None:
    message = error_of("-o", f"{RW},uidmapping={text}", "/m")
    assert message.startswith(f"uidmapping={text}: ")
    assert problem in message
    with pytest.raises(OptionError):
        parse_mappings("gidmapping", text)


def test_mapping_with_a_comma_separated_second_range_names_the_stray_part() -> None:
    """fuse-overlayfs' syntax joins ranges with ':'; a ',' starts a new option, which is then unknown."""
    assert error_of("-o", RW + ",uidmapping=0:0:1,1:1:65534", "/m") == "unknown option '1:1:65534'"


def test_squash_options() -> None:
    config = parse("-o", RW + ",squash_to_root,squash_to_uid=1000,squash_to_gid=100", "/m")
    assert config.squash_to_root
    assert (config.squash_to_uid, config.squash_to_gid) == (1000, 100)
    assert config.maps_ids


@pytest.mark.parametrize(("option", "message"), [
    ("squash_to_uid=abc", "squash_to_uid=abc: expected an id from 0 to 4294967294"),
    ("squash_to_uid=-1", "squash_to_uid=-1: expected an id from 0 to 4294967294"),
    ("squash_to_gid=4294967295", "squash_to_gid=4294967295: expected an id from 0 to 4294967294"),
    ("squash_to_uid", "option 'squash_to_uid' needs a value (squash_to_uid=…)"),
    ("squash_to_root=1", "option 'squash_to_root' takes no value"),
])
def test_squash_errors(option: str, message: str) -> None:
    assert error_of("-o", RW + "," + option, "/m") == message


# -- ignored, unsupported and unknown options ---------------------------------------------------------------

@pytest.mark.parametrize("flag", sorted(IGNORED_FLAGS))
def test_every_ignored_flag_is_accepted(flag: str) -> None:
    config = parse("-o", f"{RW},{flag}", "/m")
    assert config.ignored == (flag,)
    assert config.fuse_options == ()
    assert config == parse("-o", RW, "/m")._replace(ignored=(flag,))


@pytest.mark.parametrize("key", sorted(IGNORED_KEYS))
def test_every_ignored_key_is_accepted_with_any_value(key: str) -> None:
    option = f"{key}=system_u:object_r:container_file_t:s0"
    config = parse("-o", f"{RW},{option}", "/m")
    assert config.ignored == (option,)
    assert config.fuse_options == ()


def test_x_prefixed_fstab_options_are_ignored() -> None:
    assert parse("-o", RW + ",x-systemd.automount", "/m").ignored == ("x-systemd.automount",)


def test_the_options_the_task_lists_as_ignored_are_accepted() -> None:
    """``rw,dev,suid,nodev,nosuid,exec,noexec,noatime,relatime,context=,noacl,userxattr,…`` all parse."""
    config = parse("-o", RW + ",rw,dev,suid,nodev,nosuid,exec,noexec,noatime,relatime,context=x,fscontext=x,"
                   "defcontext=x,rootcontext=x,noacl,userxattr,redirect_dir=on,index=off,metacopy=on,"
                   "xino=auto,volatile", "/m")
    assert not config.read_only


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_unsupported_options_say_why(key: str) -> None:
    message = error_of("-o", f"{RW},{key}=1", "/m")
    assert message == f"option '{key}': {UNSUPPORTED_KEYS[key]}"


@pytest.mark.parametrize("option", ["bogus", "bogus=1", "lowerdirs=/x", "Allow_other"])
def test_unknown_option_is_named(option: str) -> None:
    assert error_of("-o", f"{RW},{option}", "/m") == f"unknown option '{option}'"


# -- FUSE options -------------------------------------------------------------------------------------------

def test_fuse_flags_and_values_pass_through_in_order() -> None:
    config = parse("-o", RW + ",allow_root,auto_unmount,attr_timeout=1,fsname=mine,max_threads=4", "/m")
    assert config.fuse_options == (("allow_root", True), ("auto_unmount", True), ("attr_timeout", 1),
                                   ("fsname", "mine"), ("max_threads", 4))


@pytest.mark.parametrize(("option", "message"), [
    ("attr_timeout=abc", "attr_timeout=abc: expected a number of seconds"),
    ("entry_timeout=-1", "entry_timeout=-1: expected a number of seconds"),
    ("negative_timeout=nan", "negative_timeout=nan: expected a number of seconds"),
    ("max_threads=0", "max_threads=0: expected an integer >= 1"),
    ("max_read=1k", "max_read=1k: expected an integer"),
    ("fsname=", "option 'fsname' needs a value (fsname=…)"),
    ("subtype", "option 'subtype' needs a value (subtype=…)"),
    ("kernel_cache=2", "option 'kernel_cache' is a flag: give it alone, or kernel_cache=0 to switch it off"),
])
def test_fuse_option_values_are_validated(option: str, message: str) -> None:
    assert error_of("-o", RW + "," + option, "/m") == message


def test_defaults_as_root() -> None:
    kwargs = fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=3, euid=0)
    libfuse3_defaults = {k: v for k, v in FUSE_DEFAULTS.items() if k != "big_writes"}
    assert kwargs == {"foreground": True, "fsname": "unionfs", **libfuse3_defaults, **ROOT_FUSE_DEFAULTS}
    assert kwargs["allow_other"] is kwargs["default_permissions"] is kwargs["dev"] is kwargs["suid"] is True
    assert kwargs["use_ino"] is kwargs["kernel_cache"] is True
    assert kwargs["subtype"] == "unionfs"
    assert all(kwargs[k] == 3600 for k in ("attr_timeout", "entry_timeout", "negative_timeout"))


def test_defaults_as_a_user_leave_out_the_root_only_ones() -> None:
    kwargs = fuse_kwargs(parse("-o", RW + ",dev,suid", "/m"), libfuse_major=3, euid=1000)
    assert kwargs == {"foreground": True, "fsname": "unionfs", **{k: v for k, v in FUSE_DEFAULTS.items()
                                                                   if k != "big_writes"}}
    for name in ("allow_other", "default_permissions", "dev", "suid"):
        assert name not in kwargs


def test_big_writes_only_with_libfuse_2() -> None:
    assert fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=2, euid=0)["big_writes"] is True
    assert "big_writes" not in fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=3, euid=0)


def test_max_threads_defaults_to_four_with_libfuse_3_and_the_user_wins() -> None:
    assert fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=3, euid=0)["max_threads"] == 4
    assert fuse_kwargs(parse("-o", RW + ",max_threads=16", "/m"), libfuse_major=3, euid=0)["max_threads"] == 16
    assert "max_threads" not in fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=2, euid=0)


def test_user_may_still_ask_for_allow_other_unprivileged() -> None:
    assert fuse_kwargs(parse("-o", RW + ",allow_other", "/m"), libfuse_major=3, euid=1000)["allow_other"]


def test_fsname_is_the_source() -> None:
    assert fuse_kwargs(parse("mysrc", "/m", "-o", RW), libfuse_major=3, euid=0)["fsname"] == "mysrc"
    assert fuse_kwargs(parse("mysrc", "/m", "-o", RW + ",fsname=x"), libfuse_major=3, euid=0)["fsname"] == "x"


def test_text_values_are_escaped_for_libfuse() -> None:
    assert fuse_kwargs(parse("a,b\\c", "/m", "-o", RW), libfuse_major=3, euid=0)["fsname"] == "a\\,b\\\\c"


def test_user_options_override_defaults_and_cancel_their_opposites() -> None:
    kwargs = fuse_kwargs(parse("-o", RW + ",nodev,nosuid,allow_root,kernel_cache=0,attr_timeout=0", "/m"),
                         libfuse_major=3, euid=0)
    assert kwargs["nodev"] is kwargs["nosuid"] is kwargs["allow_root"] is True
    for gone in ("dev", "suid", "allow_other", "kernel_cache"):
        assert gone not in kwargs
    assert kwargs["attr_timeout"] == 0


def test_a_later_mount_flag_wins_over_its_opposite() -> None:
    kwargs = fuse_kwargs(parse("-o", RW + ",nodev,dev", "/m"), libfuse_major=3, euid=0)
    assert kwargs["dev"] is True and "nodev" not in kwargs


def test_read_only_adds_the_ro_mount_flag() -> None:
    assert fuse_kwargs(parse("-o", "lowerdir=/l", "/m"), libfuse_major=3, euid=0)["ro"] is True
    assert "ro" not in fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=3, euid=0)


def test_single_threaded_and_debug_reach_libfuse() -> None:
    kwargs = fuse_kwargs(parse("-s", "-d", "-o", RW, "/m"), libfuse_major=3, euid=0)
    assert kwargs["nothreads"] is kwargs["debug"] is kwargs["foreground"] is True


def test_options_the_loaded_libfuse_lacks_are_left_out() -> None:
    config = parse("-o", RW + ",big_writes,max_write=131072,clone_fd,max_threads=8,max_read=65536", "/m")
    v3, v2 = fuse_kwargs(config, libfuse_major=3, euid=0), fuse_kwargs(config, libfuse_major=2, euid=0)
    assert "big_writes" not in v3 and "max_write" not in v3 and "max_read" not in v3
    assert v3["clone_fd"] is True and v3["max_threads"] == 8
    assert v2["big_writes"] is True and v2["max_write"] == 131072 and v2["max_read"] == 65536
    assert "clone_fd" not in v2 and "max_threads" not in v2
    assert unsupported_fuse_options(config, libfuse_major=3) == ["big_writes", "max_write", "max_read"]
    assert unsupported_fuse_options(config, libfuse_major=2) == ["clone_fd", "max_threads"]


def test_benchmarks_may_pass_their_own_defaults() -> None:
    kwargs = fuse_kwargs(parse("-o", RW, "/m"), libfuse_major=3, euid=1000, defaults={"attr_timeout": 0})
    assert kwargs == {"foreground": True, "fsname": "unionfs", "attr_timeout": 0}


# -- help ---------------------------------------------------------------------------------------------------

def test_help_names_every_ignored_and_unsupported_option_and_the_exit_statuses() -> None:
    text = help_text("unionfs-mount")
    assert text.startswith("usage: unionfs-mount ")
    for name in [*IGNORED_FLAGS, *IGNORED_KEYS, *UNSUPPORTED_KEYS, *FUSE_DEFAULTS, *ROOT_FUSE_DEFAULTS]:
        assert name in text
    assert "Exit status: 0" in text and "1 the mount failed" in text and "2 bad command line" in text


def test_benchmarks_run_unionfs_twice_with_its_own_options() -> None:
    from benchmarks.systems import FuseOverlay, make_systems

    systems = make_systems(["unionfs", "unionfs:passthrough=all+spin=off"], unionfs_opts="noacl")
    assert [s.name for s in systems] == ["unionfs", "unionfs:passthrough=all+spin=off"]
    assert isinstance(systems[1], FuseOverlay) and systems[1].extra_opts == "noacl,passthrough=all,spin=off"
    with pytest.raises(ValueError, match="unknown system 'unionfs:'"):
        make_systems(["unionfs:"])
