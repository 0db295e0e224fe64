"""Tests for kits_keras/files.py: atomic writes and JSON files (the
temporaries a killed writer leaves: tests/cli/test_outputs.py)."""

import json
import os

import pytest

from kits_keras import files


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "result.nii.gz")
    open(path, "w").write("old contents")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, failing)
    assert open(path).read() == "old contents"
    assert os.listdir(tmp_path) == ["result.nii.gz"]


def test_atomic_write_file_permissions_follow_umask(tmp_path):
    path = files.atomic_write(str(tmp_path / "a.txt"),
                           lambda tmp: open(tmp, "w").write("x"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_write_json_is_indented_atomic_and_creates_the_folder(tmp_path):
    path = str(tmp_path / "new" / "report.json")
    assert files.write_json(path, {"a": [1, 2]}) == path
    assert open(path).read() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    with pytest.raises(TypeError):  # not serialisable: old file kept
        files.write_json(path, {"a": object()})
    assert json.load(open(path)) == {"a": [1, 2]}
    assert os.listdir(tmp_path / "new") == ["report.json"]
    files.write_json(path, {"p": tmp_path}, default=str)
    assert json.load(open(path)) == {"p": str(tmp_path)}
