"""Progress lines of long CLI work: every tenth of the way when stderr is not a terminal."""

import pytest

from worker.progress import Progress


def test_progress_prints_a_tenth_at_a_time_and_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(95, "images")
    for _ in range(95):
        bar.advance()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"images: {n}/95" for n in (1, 10, 19, 28, 37, 46, 55, 64, 73,
                                                                                      82, 91, 95)]
    assert "left" not in lines[-1] and "/s" in lines[-1]
