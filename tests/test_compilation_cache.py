"""The command line keeps compiled programs on disk: a second ``diffprior sample`` of the same
shapes loads its program instead of compiling it. Each run is its own process, as a user's is."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from diffprior.compilation_cache import default_cache_dir, enable_compilation_cache

# One process running the command; it prints how many programs it compiled although the
# persistent cache was on (requests to the cache that missed).
_RUN_AND_COUNT_HITS = textwrap.dedent(
    """
    import sys
    import jax
    from diffprior.cli import main

    events = []
    jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
    status = main(sys.argv[1:])
    requests = sum(e.endswith("compile_requests_use_cache") for e in events)
    hits = sum(e.endswith("compilation_cache/cache_hits") for e in events)
    print("MISSES", requests - hits)
    sys.exit(status)
    """
)


def _problem(path):
    np.savez(
        path,
        means=np.array([[-2.0, 0.0], [2.0, 0.0]]),
        weights=np.array([0.3, 0.7]),
        scale=np.array(1.0),
        A=np.array([[1.0, 0.5]]),
        sigma_y=np.array(0.5),
        y=np.array([0.7]),
    )


def _sample(tmp_path, cache_dir, *extra):
    env = {k: v for k, v in os.environ.items() if k != "DIFFPRIOR_NO_COMPILE_CACHE"}
    env.update(DIFFPRIOR_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu")
    argv = ["sample", "--problem", str(tmp_path / "p.npz"), "--method", "tds"]
    argv += ["--num-particles", "16", "--num-steps", "8", "--out", str(tmp_path / "o.npz")]
    result = subprocess.run(
        [sys.executable, "-c", _RUN_AND_COUNT_HITS, *argv, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split("MISSES")[-1])


@pytest.mark.slow
def test_second_run_of_the_same_shapes_loads_the_compiled_program(tmp_path):
    _problem(tmp_path / "p.npz")
    cache = tmp_path / "cache"
    assert _sample(tmp_path, cache) >= 1, "the first run found everything in an empty cache"
    assert any(cache.iterdir()), "the first run wrote nothing to the cache"
    assert _sample(tmp_path, cache) == 0, "the second run compiled again"


@pytest.mark.slow
def test_no_compile_cache_writes_nothing(tmp_path):
    _problem(tmp_path / "p.npz")
    cache = tmp_path / "cache"
    _sample(tmp_path, cache, "--no-compile-cache")
    assert not cache.exists() or not any(cache.iterdir())


def test_an_unwritable_cache_is_skipped_not_fatal(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert enable_compilation_cache(blocker / "cache") is None


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFPRIOR_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DIFFPRIOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "diffprior" / "jax"
