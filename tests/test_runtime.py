"""lib.runtime: atomic file writes (the one helper every checkpoint, cache and status file goes through) and the
machine description of reports and training records."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from lib.runtime.atomic import atomic_copy, atomic_numpy_save, atomic_torch_save, atomic_write, atomic_write_json
from lib.runtime.machine import describe_machine, machine_line


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "old"})

    def half_then_fail(tmp):
        tmp.write_text('{"state": "ne')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"state": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_atomic_files_get_the_mode_of_a_plain_open_or_of_the_file_they_replace(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_json(tmp_path / "new.json", {"a": 1})
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    os.chmod(written, 0o640)
    atomic_write_json(written, {"a": 2})
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o640


def test_numpy_torch_and_copy_write_exactly_the_named_file(tmp_path):
    import torch

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    atomic_numpy_save(tmp_path / "cache.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "cache.npy"), array)
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "sub" / "ckpt.pt")
    assert torch.equal(torch.load(tmp_path / "sub" / "ckpt.pt")["w"], torch.ones(2))
    atomic_copy(tmp_path / "cache.npy", tmp_path / "copy.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "copy.npy"), array)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["cache.npy", "ckpt.pt", "copy.npy"]


def test_machine_description_is_plain_json_and_names_the_cpu():
    machine = describe_machine()
    assert json.loads(json.dumps(machine)) == machine
    assert machine["logical_cpus"] == os.cpu_count() and machine["usable_cpus"] >= 1
    assert machine["cpu_model"] in machine_line(machine)
