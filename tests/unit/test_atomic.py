import json
import os
import stat

import pytest

from megatron_spo import atomic


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so the test tells "follows the umask" from a fixed mode."""
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_the_umask_gives_a_new_file(tmp_path, umask_027):
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    atomic.write_text(tmp_path / "sub" / "b.txt", "hello")
    with atomic.open_for_write(tmp_path / "c.bin") as fh:
        fh.write(b"\x00")
    for name in ("a.json", "sub/b.txt", "c.bin"):
        assert _mode(tmp_path / name) == 0o640, name  # 0o666 & ~0o027; a mkstemp temporary is 0o600
    assert _mode(tmp_path / "sub") == 0o750


def test_directories_get_the_mode_the_umask_gives_a_new_directory(tmp_path, umask_027):
    with atomic.atomic_dir(tmp_path / "model") as tmp:
        atomic.write_text(tmp / "config.json", "{}")
    assert _mode(tmp_path / "model") == 0o750
    assert _mode(tmp_path / "model" / "config.json") == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "values.json"
    atomic.write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic.open_for_write(target) as fh:
            fh.write(b'{"new": tr')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["values.json"]


def test_a_failed_directory_build_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(tmp_path / "ckpt") as tmp:
            atomic.write_text(tmp / "half", "x")
            raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []
