"""The progress bar says when the program compiles and estimates the remaining time from the
compiled steps only (compile time is not a step)."""

from __future__ import annotations

import io
import time
from functools import partial

import jax
import pytest
from tqdm import tqdm as real_tqdm

import diffprior as dp
from diffprior.infer import sampler as sampler_module
from diffprior.infer.sampler import ProgressBar


class RecordingTqdm:
    """Records what the progress bar is asked to show."""

    instances: list[RecordingTqdm] = []

    def __init__(self, total, desc, leave):
        self.total, self.desc, self.n, self.initial = total, desc, 0, 0
        self.descriptions = [desc]
        self.resets, self.closed = [], False
        RecordingTqdm.instances.append(self)

    def set_description_str(self, desc, refresh=True):
        self.desc = desc
        self.descriptions.append(desc)

    def reset(self, total=None):
        self.resets.append(self.n)
        self.n = 0

    def refresh(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def recording(monkeypatch):
    RecordingTqdm.instances = []
    monkeypatch.setattr(sampler_module, "tqdm", RecordingTqdm)
    return RecordingTqdm.instances


def test_description_reads_compiling_until_the_first_step(recording):
    progress = ProgressBar()
    progress.open(100, "TDS (4 chains)")
    progress.compiling()
    bar = recording[0]
    assert bar.desc == "TDS (4 chains): compiling"
    progress.update(2)
    assert bar.desc == "TDS (4 chains)"
    assert bar.resets == [0] and bar.initial == 2 and bar.n == 2
    progress.update(4)
    assert bar.resets == [0] and bar.n == 4  # the clock restarts once
    progress.compiling()  # a late call (a retrace) does not relabel a running bar
    assert bar.desc == "TDS (4 chains)"
    progress.close()
    assert bar.closed


def test_remaining_time_ignores_the_time_before_the_first_step(monkeypatch):
    """A bar opened 300 s before its first step (a long compile): from the second report on the
    rate is that of the steps, so the estimate is about (total - n) times the step time."""
    monkeypatch.setattr(sampler_module, "tqdm", partial(real_tqdm, file=io.StringIO()))
    progress = ProgressBar()
    progress.open(100, "TDS (1 chains)")
    progress.bar.start_t -= 300.0  # as if compiling took five minutes
    progress.compiling()
    progress.update(2)
    time.sleep(0.05)
    progress.update(4)
    meter = progress.bar.format_dict
    rate = (meter["n"] - meter["initial"]) / meter["elapsed"]
    assert meter["elapsed"] < 10.0
    assert 96 / rate < 60 * 5  # without the restart: (300 s / 4 steps) * 96 = 2 hours
    assert meter["prefix"] == "TDS (1 chains)"
    progress.close()


@pytest.mark.slow
def test_a_run_says_compiling_only_when_it_compiles(recording):
    problem = dp.problems.gaussian_problem(jax.random.key(0), 2, 1)
    sampler = dp.Sampler(dp.Unguided(problem.model), num_particles=4, num_steps=6)
    sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    sampler.run(jax.random.key(1), *problem.model_args, **problem.model_kwargs)
    assert sampler.num_compilations == 1
    first, second = recording
    assert first.descriptions == [
        "Unguided (1 chains)",
        "Unguided (1 chains): compiling",
        "Unguided (1 chains)",
    ]
    assert second.descriptions == ["Unguided (1 chains)"] * 2  # cached: no compiling
    for bar in (first, second):
        assert bar.n == 6 and bar.initial == 1 and bar.resets == [0] and bar.closed
