"""lib.runtime: atomic file writes (the one helper every checkpoint, cache and status file goes through) and the
machine description of reports and training records."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from lib.runtime.atomic import atomic_copy, atomic_numpy_save, atomic_torch_save, atomic_write, atomic_write_json
from lib.runtime.cpu_convolution import nnpack_available
from lib.runtime.machine import describe_machine, machine_line
from lib.runtime.precision import cpu_has_native_bf16


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
    expected = ("bfloat16 (native)" if cpu_has_native_bf16()
                else "float32, NNPACK convolutions" if nnpack_available() else "float32")
    assert machine["cpu_inference"] == expected and expected in machine_line(machine)


def test_library_versions_come_from_the_installed_metadata_without_importing_the_library(tmp_path):
    """Weight and noise-model files and training records name the torch and MONAI versions: read from the installed
    metadata, since importing ``monai`` costs seconds to a command that needs nothing else of it (``learn-noise``).
    In a fresh interpreter: describe the machine, write a noise model and a weight file; no MONAI module is loaded,
    and each names the version that importing MONAI reports."""
    import sys

    import monai

    import processes
    from conftest import APP_DIR

    script = f"""
import json, sys
sys.path.insert(0, {str(APP_DIR)!r})
import torch
from lib.engines import GCNTrainingConfig
from lib.networks import GCNDenoiser
from lib.noise_learning.noise_model import NoiseModel
from lib.noise_learning.vae import ConditionalNoiseVAE, VAEConfig
from lib.runtime.machine import describe_machine
from lib.weights.format import export_weights
config = GCNTrainingConfig(features=4, n_blocks=1, layers_per_block=1)
export_weights(GCNDenoiser(**config.network_kwargs()), {str(tmp_path / 'gcn.pt')!r}, config)
NoiseModel(ConditionalNoiseVAE(VAEConfig())).save({str(tmp_path / 'noise.pt')!r})
versions = describe_machine()["versions"]
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "monai")
print(json.dumps({{"versions": versions, "monai_loaded": loaded}}))
"""
    done = processes.run([sys.executable, "-c", script], 600)  # on a timeout its whole process group is killed
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["monai_loaded"] == []
    assert report["versions"]["monai"] == monai.__version__ and report["versions"]["numpy"] == np.__version__
    import torch

    for name in ("gcn.pt", "noise.pt"):
        software = torch.load(tmp_path / name, map_location="cpu", weights_only=True)["software"]
        assert software == {"torch": torch.__version__, "monai": monai.__version__}, (name, software)


def test_one_boolean_parser_takes_the_strtobool_words_and_names_the_key_otherwise(monkeypatch):
    """``lib.runtime.switches.parse_bool``: the words of requests, ``--conf`` and the environment switches, any case
    and spaces around; real booleans and JSON's 1 / 0. Anything else is a ValueError naming the key and the words."""
    from lib.runtime.switches import parse_bool, switched_off

    for word in ("y", "Yes", " t ", "TRUE", "on", "1", 1, True):
        assert parse_bool(word, "k") is True, word
    for word in ("n", "NO", " f", "False ", "off", "0", 0, False):
        assert parse_bool(word, "k") is False, word
    for bad in ("maybe", "", "2", 2, 1.0, None, [False]):
        with pytest.raises(ValueError) as raised:
            parse_bool(bad, "params.flag")
        message = str(raised.value)
        assert message.startswith("params.flag must be true or false") and repr(bad) in message, message
        assert "y, yes, t, true, on, 1 / n, no, f, false, off, 0" in message, message
    # the environment switches read the same words as off
    for word, off in (("F", True), (" n ", True), ("off", True), ("1", False), ("yes", False)):
        monkeypatch.setenv("ADL_TEST_SWITCH", word)
        assert switched_off("ADL_TEST_SWITCH") is off, word
    monkeypatch.delenv("ADL_TEST_SWITCH")
    assert not switched_off("ADL_TEST_SWITCH")
