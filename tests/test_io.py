"""Atomic writes (diffprior.io) and the pretrained-prior layout (diffprior.train.save_pretrained)."""

import hashlib
import json
import os
import stat

import equinox as eqx
import jax
import numpy as np
import pytest

from diffprior.io import write_atomically, write_json, write_text
from diffprior.train import save_pretrained


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "table.md"
    write_text(path, "first\n")
    write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert os.listdir(path.parent) == ["table.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as a plain open() makes it


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "result.npz"
    write_text(path, "old")

    def write_half_then_fail(name):
        with open(name, "w") as f:
            f.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, write_half_then_fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.npz"]


def test_write_json_round_trips(tmp_path):
    record = {"name": "digits", "shape": [8, 8], "loss": 0.25}
    write_json(tmp_path / "meta.json", record)
    assert json.loads((tmp_path / "meta.json").read_text()) == record


def test_save_pretrained_writes_weights_and_a_checked_record(tmp_path):
    net = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    path, record = save_pretrained(tmp_path, "toy", net, {"name": "toy", "event_shape": [3]})
    assert sorted(os.listdir(tmp_path)) == ["toy.eqx", "toy.json"]
    on_disk = json.loads((tmp_path / "toy.json").read_text())
    assert on_disk == record
    assert on_disk["weights_file"] == "toy.eqx" and on_disk["event_shape"] == [3]
    assert (
        on_disk["weights_sha256"] == hashlib.sha256((tmp_path / "toy.eqx").read_bytes()).hexdigest()
    )
    reloaded = eqx.tree_deserialise_leaves(path, eqx.nn.Linear(3, 2, key=jax.random.key(1)))
    np.testing.assert_array_equal(np.asarray(reloaded.weight), np.asarray(net.weight))
