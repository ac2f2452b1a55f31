"""DiffPIR: the closed-form data step is the argmin it claims to be; finite output for
Gaussian, Student-t and nonlinear models; options checked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.optimize

import diffprior as dp
from diffprior.infer.methods import _curvature_bound
from diffprior.model import read_model


def _proximal(method, problem):
    """The method's data step, from the kernel module's public builders: the closed form in
    the model's whitened SVD, or gradient steps."""
    obs = read_model(method.model, problem.model_args, problem.model_kwargs)
    method.check(obs)
    if obs.is_linear_gaussian():
        return dp.kernels.diffpir.svd_proximal(obs.linear_gaussian()), obs
    curvature = _curvature_bound(obs)
    steps = method.options["num_grad_steps"]
    return dp.kernels.diffpir.gradient_proximal(obs.log_likelihood, curvature, steps), obs


@pytest.mark.parametrize("linear", [True, False])
def test_data_step_is_the_argmin(linear):
    """Closed form (linear Gaussian) or gradient steps (Student-t) against a numerical
    minimiser of -log p(y | x) + rho/2 ||x - x0_hat||^2."""
    problem = dp.problems.gaussian_problem(jax.random.key(5), 6, 3)
    if linear:
        model = problem.model
    else:

        def model(A, sigma_y, y=None):
            x = numpyro.sample("x", problem.prior)
            numpyro.sample("y", dist.StudentT(4.0, A @ x, sigma_y).to_event(1), obs=y)

    prox, obs = _proximal(dp.DiffPIR(model, num_grad_steps=500), problem)
    assert obs.is_linear_gaussian() == linear
    x0_hat = jax.random.normal(jax.random.key(1), (6,))
    rho = 2.5

    def objective(x):
        return -obs.log_likelihood(x) + 0.5 * rho * jnp.sum((x - x0_hat) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(objective))

    def fun(x):
        value, grad = value_and_grad(jnp.asarray(x, jnp.float32))
        return float(value), np.asarray(grad, dtype=np.float64)

    numeric = scipy.optimize.minimize(fun, np.asarray(x0_hat), jac=True, method="BFGS").x
    np.testing.assert_allclose(np.asarray(prox(x0_hat, rho)), numeric, atol=2e-3)


def test_finite_on_mixture_problem_gaussian_and_student_t():
    problem = dp.problems.mixture_problem(jax.random.key(0), 8, 2)

    def student(A, sigma_y, y=None):
        x = numpyro.sample("x", problem.prior)
        numpyro.sample("y", dist.StudentT(3.0, A @ x, sigma_y).to_event(1), obs=y)

    for model in (problem.model, student):
        sampler = dp.Sampler(dp.DiffPIR(model), num_particles=128, num_steps=30, progress_bar=False)
        sampler.run(jax.random.key(0), *problem.model_args, **problem.model_kwargs)
        assert np.all(np.isfinite(np.asarray(sampler.get_samples()["x"])))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"lam": 0.0}, ValueError),
        ({"zeta": 1.5}, ValueError),
        ({"num_grad_steps": 0}, ValueError),
        ({"num_grad_steps": 2.0}, TypeError),
        ({"rho": 1}, TypeError),
    ],
)
def test_bad_options(options, error):
    problem = dp.problems.gaussian_problem(jax.random.key(0), 2, 1)
    with pytest.raises(error):
        dp.DiffPIR(problem.model, **options)
