"""JobDir.poke wakes a supervisor through the job's FIFO and never blocks or writes a file."""

from __future__ import annotations

import os
from pathlib import Path

from kbatch.backends.local.jobdir import JobDir


def test_poke_without_a_reader_or_a_fifo_does_nothing(tmp_path: Path) -> None:
    jobdir = JobDir(tmp_path)
    jobdir.poke()  # no FIFO at all
    os.mkfifo(jobdir.wake)
    jobdir.poke()  # a FIFO no one reads: ENXIO, not a wait
    jobdir.wake.unlink()
    jobdir.wake.write_text("")  # a regular file in its place is left alone
    jobdir.poke()
    assert jobdir.wake.read_text() == ""


def test_a_cancel_request_wakes_the_reader(tmp_path: Path) -> None:
    jobdir = JobDir(tmp_path)
    os.mkfifo(jobdir.wake)
    reader = os.open(jobdir.wake, os.O_RDWR | os.O_NONBLOCK)  # as the supervisor opens it
    try:
        jobdir.request_cancel()
        assert jobdir.cancel.exists()
        assert os.read(reader, 16) == b"!"
    finally:
        os.close(reader)
