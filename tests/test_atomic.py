"""komt.atomic: a failed write leaves the old file and no temp file; stale temp files of dead writers go."""

from __future__ import annotations

import os

import pytest

from komt.atomic import atomic_file, remove_stale_temp_files, write_text_atomic


def test_a_failed_write_leaves_the_old_file_intact_and_no_temp_file(tmp_path):
    """Catches the in-place writer: opening the target itself would truncate it before the failure."""
    target = tmp_path / "config.json"
    target.write_text("old contents\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_file(target) as f:
            f.write("new, half written")
            f.flush()
            assert target.read_text() == "old contents\n"  # readers still see the old file meanwhile
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_successful_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with atomic_file(target, "wb") as f:
        f.write(b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # an ordinary file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temp_files_are_named_for_their_target(tmp_path):
    target = tmp_path / "model.safetensors"
    with atomic_file(target, "wb") as f:
        temps = [p.name for p in tmp_path.iterdir()]
        f.write(b"x")
    assert len(temps) == 1 and temps[0].startswith(".model.safetensors.komt-tmp-")


def test_stale_temp_files_of_dead_writers_go_and_a_live_writers_stays(tmp_path):
    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.safetensors.komt-tmp-deadbeef"  # no process holds its lock
    dead.write_bytes(b"x" * 1000)
    other = tmp_path / ".other.safetensors.komt-tmp-deadbeef"  # another target's: not ours to remove
    other.write_bytes(b"x")
    with atomic_file(target, "wb") as f:
        assert not dead.exists()  # removed when this write began
        live = [p for p in tmp_path.glob(".model.safetensors.komt-tmp-*")]
        assert len(live) == 1
        assert remove_stale_temp_files(target) == []  # its writer (this one) holds the lock
        assert live[0].exists()
        f.write(b"new")
    assert target.read_bytes() == b"new" and other.exists()


def test_write_text_atomic_writes_utf8(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "한국어\n")
    assert (tmp_path / "a.txt").read_bytes() == "한국어\n".encode()
