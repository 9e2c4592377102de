import pytest

from kbatch.errors import SpecError
from kbatch.units import format_duration, format_memory, parse_memory, parse_time_limit

GiB = 1024**3
MiB = 1024**2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500M", 500 * MiB),
        ("2G", 2 * GiB),
        ("1.5Gi", int(1.5 * GiB)),
        ("100", 100 * MiB),  # Slurm: a bare number is MiB
        ("4GB", 4 * GiB),
        ("64g", 64 * GiB),
        ("1T", 1024 * GiB),
        ("512K", 512 * 1024),
        ("0", 0),
    ],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "2X", "G", "-1G", "1.2.3G", "two gigs", "1.5"])
def test_parse_memory_rejects_with_a_hint(text: str) -> None:
    if text == "1.5":  # 1.5 MiB is a whole number of bytes: allowed
        assert parse_memory(text) == int(1.5 * MiB)
        return
    with pytest.raises(SpecError, match=r"e\.g\. 500M, 2G"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("3", 180),
        ("30:15", 1815),
        ("1:00:00", 3600),
        ("11:0:0", 39600),
        ("1-12", 129600),
        ("1-12:30", 131400),
        ("2-00:00:00", 172800),
        ("0-0:1", 60),
        ("0", None),
        ("UNLIMITED", None),
        ("infinite", None),
    ],
)
def test_parse_time_limit(text: str, seconds: int | None) -> None:
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "1-", "a:b", "1-2-3"])
def test_parse_time_limit_rejects_with_the_formats(text: str) -> None:
    with pytest.raises(SpecError, match="D-HH:MM:SS"):
        parse_time_limit(text)


def test_formatting() -> None:
    assert format_duration(0) == "0:00"
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(90061) == "1-01:01:01"
    assert format_duration(None) == "UNLIMITED"
    assert format_memory(1536 * MiB) == "1.5G"
    assert format_memory(None) == "-"
