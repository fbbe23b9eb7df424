"""The device-profile table: shipped defaults, user overrides, errors."""

from __future__ import annotations

import pytest

from harmony.profiles import (
    Availability,
    DeviceProfile,
    ProfileError,
    UnknownProfileError,
    get_profile,
    load_profiles,
    resolve_class,
)

SHIPPED = ["pi_zero_2", "pi4", "pi5", "jetson_nano", "jetson_orin_nano", "laptop", "server"]


def test_shipped_profiles_load_with_positive_fields_and_sources():
    profiles = load_profiles()
    assert set(SHIPPED) <= set(profiles)
    for name, p in profiles.items():
        assert isinstance(p, DeviceProfile) and p.name == name
        assert isinstance(p.compute_flops, float) and p.compute_flops > 0
        assert isinstance(p.uplink_bps, float) and p.uplink_bps > 0
        assert isinstance(p.memory_bytes, int) and p.memory_bytes > 0
        assert isinstance(p.cores, int) and p.cores > 0
        assert p.source.strip()
        assert "assum" in p.source  # the derating is stated as an assumption


def test_shipped_numbers():
    pi_zero_2 = get_profile("pi_zero_2")
    assert pi_zero_2.compute_flops == 3e9
    assert pi_zero_2.uplink_bps == 20e6
    assert pi_zero_2.memory_bytes == 512 * 2**20
    assert get_profile("server").compute_flops == 2e12


def test_default_client_order_is_ascending_in_compute():
    # the config's default client_profiles, lowest depth first
    order = ["pi_zero_2", "pi4", "pi5", "jetson_nano", "jetson_orin_nano"]
    rates = [get_profile(n).compute_flops for n in order]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    assert get_profile("server").compute_flops > max(rates)


def test_user_file_overrides_and_adds(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "pi4:\n"
        "  uplink_bps: 940_000_000\n"
        "my_board:\n"
        "  compute_flops: 5e9\n"  # PyYAML reads this as a string; accepted
        "  uplink_bps: 50_000_000\n"
        "  memory_bytes: 2_147_483_648\n"
        "  cores: 2\n"
        "  source: measured with the agent's micro-benchmark\n"
    )
    profiles = load_profiles(path)
    default_pi4 = load_profiles()["pi4"]
    assert profiles["pi4"].uplink_bps == 940e6
    assert profiles["pi4"].compute_flops == default_pi4.compute_flops  # other fields kept
    assert "uplink_bps overridden" in profiles["pi4"].source and str(path) in profiles["pi4"].source
    assert profiles["my_board"] == DeviceProfile("my_board", 5e9, 50e6, 2**31, 2, "measured with the "
                                                 "agent's micro-benchmark")
    assert set(SHIPPED) <= set(profiles)
    assert load_profiles()["pi4"] == default_pi4  # the shipped table is not mutated
    assert get_profile("my_board", profiles).cores == 2


def test_unknown_profile_lists_names():
    with pytest.raises(UnknownProfileError) as info:
        get_profile("pi3")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "'pi3'" in message
    for name in SHIPPED:
        assert name in message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("pi4:\n  uplink_bps: -5\n", ["'pi4'", "'uplink_bps'"]),
        ("pi4:\n  compute_flops: fast\n", ["'pi4'", "'compute_flops'"]),
        ("pi4:\n  cores: 2.5\n", ["'pi4'", "'cores'"]),
        ("pi4:\n  memory_bytes: 0\n", ["'pi4'", "'memory_bytes'"]),
        ("pi4:\n  cores: true\n", ["'pi4'", "'cores'"]),
        ("pi4:\n  clock_hz: 1.5e9\n", ["'pi4'", "'clock_hz'"]),
        ("pi4:\n  source: ''\n", ["'pi4'", "'source'"]),
        ("new_board:\n  compute_flops: 1_000\n", ["'new_board'", "missing field"]),
        ("pi4: 7\n", ["'pi4'"]),
        ("pi4:\n  downlink_bps: 0\n", ["'pi4'", "'downlink_bps'"]),
        ("pi4:\n  latency_ms: -1\n", ["'pi4'", "'latency_ms'"]),
        ("pi4:\n  availability: sometimes\n", ["'pi4'", "'availability'", "on_s"]),
        ("pi4:\n  availability: {on_s: 10}\n", ["'pi4'", "'availability'"]),
        ("pi4:\n  availability: {on_s: 10, off_s: 0}\n", ["'pi4'", "'availability.off_s'"]),
    ],
)
def test_bad_field_names_profile_and_field(tmp_path, text, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profiles(path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- pi4\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profiles(path)


def test_empty_user_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_profiles(path) == load_profiles()


def test_emulation_fields_of_the_shipped_classes():
    """What `harmony fleet emulate` enforces: every class has a downlink, a link latency and an
    availability model; the shipped ones are always on."""
    for name, p in load_profiles().items():
        assert p.downlink > 0 and p.latency_ms >= 0 and p.availability is None, name
    zero = get_profile("pi_zero_2")
    assert (zero.downlink_bps, zero.latency_ms) == (30e6, 5.0)


def test_a_new_profile_may_leave_the_emulation_fields_out_and_on_off_periods_parse(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("board:\n  compute_flops: 1_000_000_000\n  uplink_bps: 1_000_000\n  memory_bytes: 1024\n"
                    "  cores: 1\n  source: a battery board\n  availability: {on_s: 60, off_s: 30}\n")
    board = load_profiles(path)["board"]
    assert board.downlink == 1e6 and board.latency_ms == 0.0  # defaults: as the uplink, no latency
    assert board.availability == Availability(60.0, 30.0)
    assert [board.availability.is_on(t) for t in (0, 59.9, 60, 89.9, 90)] == [True, True, False, False, True]


@pytest.mark.parametrize(("spelling", "name"), [("pi-zero2", "pi_zero_2"), ("jetson-nano", "jetson_nano"),
                                                ("pi4", "pi4"), ("Jetson-Orin-Nano", "jetson_orin_nano")])
def test_command_line_spellings_map_to_the_yaml_names(spelling, name):
    assert resolve_class(spelling) == name


def test_an_unknown_spelling_lists_the_classes():
    with pytest.raises(UnknownProfileError, match="pi_zero_2"):
        resolve_class("pi-zero3")
