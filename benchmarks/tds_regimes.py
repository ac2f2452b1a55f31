"""TDS's guided and subspace proposals where the guided one struggles: many observed coordinates
and near-noiseless observations, against exact answers.

Scenarios (``--scenario``):

- ``image``: a Gaussian prior (a one-component ``dp.GaussianMixture``, unit variance, a smooth
  mean) on a ``size x size`` image, half the pixels observed (``dp.operators.Inpaint``) at
  ``--sigma`` (default 0.05). Exact evidence from ``prior.log_evidence``; the posterior mean in
  closed form. Reports the log-evidence error per chain, the RMSE of the samples' mean to the
  exact posterior mean over its Monte Carlo floor (``sqrt(mean posterior variance / samples)``,
  so about 1 for independent exact draws), and the smallest ESS / N over the steps.
- ``noiseless``: ``dp.problems.mixture_problem(key(2), d, 2)`` with ``sigma_y`` replaced by
  ``--sigma`` (1e-4, 1e-6) and ``y`` redrawn from the true ``x``. Reports the log-evidence error
  per chain and the sliced Wasserstein distance of the samples to exact posterior draws over
  the floor (two exact sets).
- ``likelihoods``: a d = 2 two-component mixture observed through ``y = x1 + x2`` with Normal,
  Laplace or Student-t (df 4) noise of scale ``--sigma`` (1e-3, 1e-4). The projection
  ``s = x1 + x2`` is a one-dimensional mixture, so the exact evidence is a quadrature over
  ``s`` on a grid far finer than the noise. Reports the log-evidence error per chain and the
  warnings the run gave (TDS's default proposal; FK's is the same kernel).
- ``mixture``: ``dp.problems.mixture_problem(key(seed), d, dy)`` as is (e.g. d = 4096, 2048
  observations), scored as ``noiseless``; ``--calibrate N`` first calibrates the prior on N of
  its own draws (``dp.calibrate``).

Example: ``python benchmarks/tds_regimes.py --scenario image --size 32 --proposals guided
subspace``. Prints one markdown row per (scenario, proposal).
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy import stats
from scipy.special import logsumexp

import diffprior as dp
from diffprior.benchmark import exact_reference
from diffprior.diagnostics import sliced_wasserstein


def _sample(method, particles, steps, chains, args, kwargs, seed=1):
    sampler = dp.Sampler(method, particles, steps, num_chains=chains, progress_bar=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler.run(jax.random.key(seed), *args, **kwargs)
    seconds = time.perf_counter() - start
    min_ess = float(np.min(np.asarray(sampler._result["per_step"]["ess"]))) / particles
    return sampler, seconds, min_ess


def _image_case(size, sigma):
    shape = (size, size)
    d = size * size
    grid = jnp.linspace(-1.0, 1.0, size)
    mean = (0.5 * jnp.sin(3 * grid)[:, None] * jnp.cos(2 * grid)[None, :]).reshape(-1)
    prior = dp.GaussianMixture(mean[None], jnp.array([1.0]))
    A = dp.operators.Inpaint(dp.operators.random_mask(jax.random.key(3), shape, 0.5))
    x_true = prior.sample(jax.random.key(4))
    y = A(x_true.reshape(shape)) + sigma * jax.random.normal(jax.random.key(5), A.out_shape)

    def model(y=None):
        x = numpyro.sample("x", prior)
        numpyro.sample(
            "y", dist.Normal(A(x.reshape(shape)), sigma).to_event(len(A.out_shape)), obs=y
        )

    exact = float(prior.log_evidence(A, sigma, y))
    # unit-variance prior: observed pixels (mean sigma^2 + y) / (sigma^2 + 1), the others keep
    # the prior's mean and variance
    observed = jnp.asarray(A.mask).reshape(-1)
    y_full = jnp.zeros(d).at[jnp.flatnonzero(observed)].set(y.reshape(-1))
    post_mean = jnp.where(observed, (mean * sigma**2 + y_full) / (sigma**2 + 1.0), mean)
    post_var = jnp.where(observed, sigma**2 / (sigma**2 + 1.0), 1.0)
    return model, (), {"y": y}, exact, np.asarray(post_mean), float(jnp.mean(post_var))


def image(args):
    model, margs, kwargs, exact, post_mean, mean_var = _image_case(args.size, args.sigma)
    for proposal in args.proposals:
        sampler, seconds, min_ess = _sample(
            dp.TDS(model, proposal=proposal), args.particles, args.steps, args.chains, margs, kwargs
        )
        errors = np.asarray(sampler.log_evidence) - exact
        x = np.asarray(sampler.get_samples(group_by_chain=True)["x"])  # (chains, N, d)
        rmse = np.sqrt(np.mean((x.mean(1) - post_mean) ** 2, axis=-1))
        floor = np.sqrt(mean_var / x.shape[1])
        print(
            f"| image {args.size}x{args.size}, sigma {args.sigma:g} | {proposal} | "
            f"{_fmt(errors)} | {_fmt(rmse / floor, '.2f')} | {min_ess:.3f} | {seconds:.0f} |",
            flush=True,
        )


def _score_mixture(label, problem, args, seed):
    exact_draws, key_p, floor = exact_reference(problem, seed, args.num_samples)
    exact = float(problem.log_evidence)
    for proposal in args.proposals:
        sampler, seconds, min_ess = _sample(
            dp.TDS(problem.model, proposal=proposal),
            args.particles,
            args.steps,
            args.chains,
            problem.model_args,
            problem.model_kwargs,
        )
        errors = np.asarray(sampler.log_evidence) - exact
        x = sampler.get_samples()["x"]
        index = jax.random.permutation(jax.random.key(0), x.shape[0])[: args.num_samples]
        finite = bool(np.all(np.isfinite(np.asarray(x))))
        ratio = (
            float(sliced_wasserstein(key_p, x[index], exact_draws)) / floor if finite else np.nan
        )
        print(
            f"| {label} | {proposal} | {_fmt(errors)} | {ratio:.2f} | {min_ess:.3f} | "
            f"{seconds:.0f} |",
            flush=True,
        )


def noiseless(args):
    base = dp.problems.mixture_problem(jax.random.key(2), args.dim, 2)
    sigma = jnp.float32(args.sigma)
    y = base.A @ base.x_true + sigma * jax.random.normal(jax.random.key(9), (2,))
    problem = base._replace(sigma_y=sigma, y=y)
    _score_mixture(f"mixture d={args.dim}, 2 obs, sigma {args.sigma:g}", problem, args, 2)


def mixture(args):
    problem = dp.problems.mixture_problem(jax.random.key(args.seed), args.dim, args.obs)
    label = f"mixture d={args.dim}, {args.obs} obs, sigma {float(problem.sigma_y):.3g}"
    if args.calibrate:
        draws = problem.prior.sample(jax.random.key(123), (args.calibrate,))
        problem = problem._replace(prior=dp.calibrate(problem.prior, draws))
        label += f", calibrated on {args.calibrate} prior draws"
    _score_mixture(label, problem, args, args.seed)


def likelihoods(args):
    prior = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 1.0]]), jnp.array([0.7, 0.3]))
    y, scale = 2.5, args.sigma
    # s = x1 + x2 is a mixture of N(mu_1 + mu_2, 2 v) (isotropic components of variance v)
    means = np.asarray(prior.means, np.float64).sum(axis=1)
    variances = 2.0 * np.broadcast_to(np.asarray(prior.variances, np.float64), (2, 2))[:, 0]
    log_weights = np.log(np.asarray(prior.weights, np.float64))
    grid = np.linspace(y - 2000 * scale, y + 2000 * scale, 400_001)
    log_p = logsumexp(
        log_weights[:, None]
        + stats.norm.logpdf(grid[None], means[:, None], np.sqrt(variances)[:, None]),
        axis=0,
    )
    families = {
        "normal": (lambda m: dist.Normal(m, scale), stats.norm.logpdf(y, grid, scale)),
        "laplace": (lambda m: dist.Laplace(m, scale), stats.laplace.logpdf(y, grid, scale)),
        "student_t df=4": (
            lambda m: dist.StudentT(4.0, m, scale),
            stats.t.logpdf(y, 4.0, grid, scale),
        ),
    }
    for name, (make, log_lik) in families.items():
        exact = float(logsumexp(log_p + log_lik) + np.log(grid[1] - grid[0]))

        def model(y=None, make=make):
            x = numpyro.sample("x", prior)
            numpyro.sample("y", make(x[0] + x[1]), obs=y)

        sampler = dp.Sampler(
            dp.TDS(model),
            num_particles=args.particles,
            num_steps=args.steps,
            num_chains=args.chains,
            progress_bar=False,
        )
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler.run(jax.random.key(0), y=jnp.float32(y))
        seconds = time.perf_counter() - start
        said = "; ".join(str(w.message).split(":")[1].strip()[:40] for w in caught) or "none"
        ess = np.asarray(sampler.to_arviz()["sample_stats"]["ess"].values)
        print(
            f"| {name}, scale {scale:g} | default | "
            f"{_fmt(np.asarray(sampler.log_evidence) - exact)} | warning: {said} | "
            f"{ess.min() / args.particles:.3f} | {seconds:.0f} |",
            flush=True,
        )


def _fmt(values, spec="+.2f"):
    return " / ".join(format(float(v), spec) for v in np.asarray(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", choices=("image", "noiseless", "likelihoods", "mixture"), required=True
    )
    parser.add_argument("--proposals", nargs="+", default=["guided", "subspace"])
    parser.add_argument("--size", type=int, default=32, help="image side (image)")
    parser.add_argument("--dim", type=int, default=8, help="d (noiseless, mixture)")
    parser.add_argument("--obs", type=int, default=2, help="observations (mixture)")
    parser.add_argument("--seed", type=int, default=0, help="problem seed (mixture)")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale (image, noiseless)")
    parser.add_argument(
        "--calibrate",
        type=int,
        default=0,
        help="mixture: calibrate the prior on this many of its own draws (dp.calibrate) first",
    )
    parser.add_argument("--particles", type=int, default=512)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=1000, help="exact draws for SW")
    args = parser.parse_args()
    print("| problem | proposal | log-evidence error per chain | score | min ESS / N | seconds |")
    print("|---|---|---|---|---|---|")
    scenarios = {"image": image, "noiseless": noiseless, "likelihoods": likelihoods}
    {**scenarios, "mixture": mixture}[args.scenario](args)


if __name__ == "__main__":
    main()
