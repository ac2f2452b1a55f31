"""Repeated reads and runs of one model with new values: what diffprior.model.ModelReader and
dp.Sampler keep between them (the provenance tracking, the method's check) is reused only for
arguments of the same structure, and every check on the new values still runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import diffprior as dp
from diffprior import model as model_module
from diffprior.model import ModelError, ModelReader, arguments_key, read_model

NUM_PARTICLES, NUM_STEPS = 16, 5


@pytest.fixture(scope="module")
def problem():
    """A d = 8 Gaussian-mixture prior, y = A x + sigma_y noise with two observations."""
    return dp.problems.mixture_problem(jax.random.key(0), 8, 2)


def _counter(monkeypatch, owner, name):
    """Count the calls of ``owner.name`` (still calling it)."""
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _sampler(method):
    return dp.Sampler(method, num_particles=NUM_PARTICLES, num_steps=NUM_STEPS, progress_bar=False)


# -- ModelReader --------------------------------------------------------------------------------


def test_reader_tracks_provenance_once_per_structure(monkeypatch, problem):
    provenance = _counter(monkeypatch, model_module, "_sites_depending_on_x")
    reader = ModelReader(problem.model)
    A, sigma_y, y = problem.A, problem.sigma_y, problem.y

    first = reader((A, sigma_y), {"y": y})
    second = reader((A * 2.0, sigma_y * 0.5), {"y": y + 1.0})
    assert len(provenance) == 1
    np.testing.assert_array_equal(second.observed["y"], y + 1.0)
    assert second.likelihood_sites == first.likelihood_sites == ("y",)

    reader((A[:1], sigma_y), {"y": y[:1]})  # new shapes
    assert len(provenance) == 2
    reader((A, 0.5), {"y": y})  # a Python float: a static argument
    reader((A, 0.7), {"y": y})  # another static value
    assert len(provenance) == 4
    reader((A, sigma_y), {"y": y})  # the first structure is still kept
    assert len(provenance) == 4

    # the reused reading is the one read_model makes from scratch
    fresh = read_model(problem.model, (A * 2.0, sigma_y * 0.5), {"y": y + 1.0})
    x = jnp.linspace(-1.0, 1.0, 8)
    assert float(second.log_likelihood(x)) == pytest.approx(float(fresh.log_likelihood(x)))


def test_arguments_key_splits_as_the_compiled_program(problem):
    A, y = problem.A, problem.y
    key = arguments_key((A, 0.5), {"y": y})
    assert key == arguments_key((A + 1.0, 0.5), {"y": -y})
    assert key != arguments_key((A, 0.5), {"y": y[:1]})
    assert key != arguments_key((A, 0.5), {"y": y.astype(jnp.int32)})
    assert key != arguments_key((A, 1), {"y": y})  # 1 == 0.5 * 2, but an int is not a float
    assert key != arguments_key((A,), {"y": y, "sigma": 0.5})
    assert arguments_key(({"a": 1},), {}) is not None
    assert arguments_key((np.float32(1.0),), {}) == arguments_key((np.float32(2.0),), {})


@pytest.mark.parametrize(
    ("args", "y", "match"),
    [
        (None, "nan", r"site 'y': observed value has 1 NaN"),
        (None, "inf", r"site 'y': observed value has 0 NaN and 1 inf"),
        ("negative scale", None, r"site 'y': Normal scale must be > 0"),
    ],
)
def test_reader_checks_the_values_of_every_read(monkeypatch, problem, args, y, match):
    provenance = _counter(monkeypatch, model_module, "_sites_depending_on_x")
    reader = ModelReader(problem.model)
    reader(problem.model_args, {"y": problem.y})
    bad_args = (problem.A, -problem.sigma_y) if args else problem.model_args
    bad_y = problem.y.at[1].set(float(y)) if y else problem.y
    assert arguments_key(bad_args, {"y": bad_y}) == arguments_key(
        problem.model_args, {"y": problem.y}
    )
    with pytest.raises(ModelError, match=match) as cached:
        reader(bad_args, {"y": bad_y})
    with pytest.raises(ModelError) as fresh:
        read_model(problem.model, bad_args, {"y": bad_y})
    assert str(cached.value) == str(fresh.value)
    assert len(provenance) == 1


def test_reader_tracks_again_when_the_sites_change(monkeypatch):
    """Same arguments, but the model's sites changed (it reads a global): tracked again."""
    provenance = _counter(monkeypatch, model_module, "_sites_depending_on_x")
    prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
    names = ["y"]

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample(names[0], dist.Normal(x[0], 0.5), obs=y)

    reader = ModelReader(model)
    assert reader((), {"y": jnp.array(1.0)}).likelihood_sites == ("y",)
    names[0] = "z"
    assert reader((), {"y": jnp.array(1.0)}).likelihood_sites == ("z",)
    assert len(provenance) == 2


def test_reader_keeps_the_sites_that_do_not_depend_on_x(monkeypatch):
    provenance = _counter(monkeypatch, model_module, "_sites_depending_on_x")
    prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))

    def model(s, y=None):
        x = numpyro.sample("x", prior)
        scale = numpyro.sample("s", dist.HalfNormal(1.0), obs=s)
        numpyro.sample("y", dist.Normal(x[0], scale), obs=y)

    reader = ModelReader(model)
    for value in (0.5, 0.7):
        args, kwargs = (jnp.array(value),), {"y": jnp.array(1.0)}
        cached = reader(args, kwargs)
        fresh = read_model(model, args, kwargs)
        assert (cached.likelihood_sites, cached.fixed_sites) == (("y",), ("s",))
        assert (fresh.likelihood_sites, fresh.fixed_sites) == (("y",), ("s",))
        # the fixed site's value is a parameter of the likelihood, not an observation of x
        assert len(reader.observed_values) == 1 and reader.observed_values[0] is kwargs["y"]
    assert len(provenance) == 1 + 2  # the reader's first read, and read_model's two


# -- Sampler ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tds_run(problem):
    """A compiled TDS sampler (proposal "auto": the subspace one, after a linear-Gaussian
    check) with one run done."""
    sampler = _sampler(dp.TDS(problem.model))
    sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
    return sampler


class _CountingTDS(dp.TDS):
    """A user's method with its own check, which may read the observed values."""

    def __init__(self, model):
        super().__init__(model)
        self.num_checks = 0

    def check(self, obs):
        self.num_checks += 1
        super().check(obs)


def test_second_run_skips_the_reading_and_the_check(monkeypatch, problem, tds_run):
    provenance = _counter(monkeypatch, model_module, "_sites_depending_on_x")
    checks = _counter(monkeypatch, model_module.ObservationModel, "is_linear_gaussian")
    y_new = problem.y + 0.5
    tds_run.run(jax.random.key(1), *problem.model_args, y=y_new)
    cached = np.asarray(tds_run.get_samples()["x"])
    assert (len(provenance), len(checks)) == (0, 0)
    assert tds_run.num_compilations == 1

    # a sampler from scratch (its first run reads, checks and compiles) draws the same samples,
    # and a user's check (it may read the observed values) runs at every run
    method = _CountingTDS(problem.model)
    fresh = _sampler(method)
    fresh.run(jax.random.key(1), *problem.model_args, y=y_new)
    assert len(provenance) >= 1 and len(checks) == 1
    np.testing.assert_allclose(cached, np.asarray(fresh.get_samples()["x"]), rtol=1e-5, atol=1e-5)
    fresh.run(jax.random.key(1), *problem.model_args, y=problem.y)
    assert method.num_checks == 2 and len(checks) == 2


@pytest.mark.parametrize("bad", ["nan", "negative scale"])
def test_bad_values_after_a_cached_run_still_raise(problem, tds_run, bad):
    tds_run.run(jax.random.key(0), *problem.model_args, y=problem.y)
    args, y = problem.model_args, problem.y
    if bad == "nan":
        y, match = y.at[0].set(jnp.nan), r"'y'.*NaN"
    else:
        args, match = (problem.A, -problem.sigma_y), r"'y'.*Normal scale must be > 0"
    with pytest.raises(ModelError, match=match):
        tds_run.run(jax.random.key(0), *args, y=y)
    tds_run.run(jax.random.key(0), *problem.model_args, y=problem.y)  # and runs after
    assert tds_run.num_compilations == 1


def test_a_changed_operator_runs_the_check_again(problem):
    """MCGdiff(noiseless=True) needs A of full row rank: a rank-deficient A of the same shape
    is refused at the second run too, as a NumPy A changed in place is checked again."""
    sampler = _sampler(dp.MCGdiff(problem.model, noiseless=True))
    A = np.asarray(problem.A).copy()
    sampler.run(jax.random.key(0), A, problem.sigma_y, y=problem.y)
    A[1] = A[0]  # in place: the same object, new values
    with pytest.raises(ModelError, match="full row rank"):
        sampler.run(jax.random.key(0), A, problem.sigma_y, y=problem.y)
    with pytest.raises(ModelError, match="full row rank"):
        sampler.run(jax.random.key(0), jnp.asarray(A), problem.sigma_y, y=problem.y)
    assert sampler.num_compilations == 1
