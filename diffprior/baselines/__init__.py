r"""MCMC baselines on the very same NumPyro model, and a side-by-side comparison of samplers.

The diffusion samplers (:class:`diffprior.Sampler`) never evaluate the prior's density; the
baselines here do, so they need a prior with a ``log_prob``: a
:class:`~diffprior.GaussianMixture` (exact) or a :class:`~diffprior.DiffusionPrior` (through its
probability-flow ODE: a few hundred network calls per density, slow but fine for small ``d``).
A :class:`~diffprior.LatentDiffusionPrior` has no density on the image space and is refused.

- :class:`NUTS` (:mod:`diffprior.baselines.nuts`): NumPyro's No-U-Turn sampler (Hoffman &
  Gelman 2014) on the user's model.
- :class:`TemperedSMC` (:mod:`diffprior.baselines.tempered`): BlackJAX's adaptive tempered SMC
  (Del Moral et al. 2006; the next temperature keeps the ESS at ``target_ess``, Jasra et al.
  2011) from prior draws to the posterior :math:`p(x)\, p(y \mid x)^{\lambda}`,
  :math:`\lambda: 0 \to 1`, with random-walk Metropolis or HMC moves tuned between steps; it
  also estimates :math:`\log p(y)`.
- :func:`compare` and :func:`plot_compare` (:mod:`diffprior.baselines.comparison`): a table
  (seconds, ESS per second, R-hat, sliced Wasserstein to exact draws, log-evidence) and an
  overlay of marginals for several results.

Examples
--------
>>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
>>> import diffprior as dp
>>> prior = dp.GaussianMixture(jnp.zeros((1, 2)), jnp.ones(1))
>>> def model(y=None):
...     x = numpyro.sample("x", prior)
...     numpyro.sample("y", dist.Normal(x[0], 0.5), obs=y)
>>> nuts = dp.baselines.NUTS(model, num_warmup=100, num_samples=100, num_chains=2,
...                          progress_bar=False)
>>> nuts.run(jax.random.key(0), y=1.0)
>>> smc = dp.baselines.TemperedSMC(model, num_particles=200, progress_bar=False)
>>> smc.run(jax.random.key(1), y=1.0)
>>> posterior = prior.posterior(jnp.array([[1.0, 0.0]]), 0.5, jnp.array([1.0]))
>>> table = dp.compare({"nuts": nuts, "smc": smc}, reference=posterior)
>>> list(table.index)
['nuts', 'smc']
"""

from diffprior.baselines.comparison import COMPARE_COLUMNS, compare, plot_compare
from diffprior.baselines.nuts import NUTS
from diffprior.baselines.tempered import DENSE_MAX_DIM, MCMC_KERNELS, TemperedSMC

__all__ = [
    "NUTS",
    "TemperedSMC",
    "compare",
    "plot_compare",
    "COMPARE_COLUMNS",
    "DENSE_MAX_DIM",
    "MCMC_KERNELS",
]
