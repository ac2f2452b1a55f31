"""Quickstart: a Gaussian-mixture prior in two dimensions, seen as a diffusion model.

A Gaussian mixture has an exact denoiser, so it is a diffusion prior whose answers are known:
exact samples, exact density, and, for a linear Gaussian observation y = A x + N(0, sigma_y^2),
the exact posterior (again a Gaussian mixture) and the exact evidence log p(y). Reverse diffusion
with its denoiser must reproduce them.

Run with ``python examples/quickstart.py``.
"""

import jax
import jax.numpy as jnp

import diffprior as dp

# Prior: three well-separated components in d = 2.
means = jnp.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
weights = jnp.array([0.5, 0.3, 0.2])
prior = dp.GaussianMixture(means, weights, scale=0.5)

# Observation: only the sum x_1 + x_2 is seen, with noise sigma_y.
A = jnp.array([[1.0, 1.0]])
sigma_y = 0.3
y = jnp.array([2.8])

posterior = prior.posterior(A, sigma_y, y)  # exact, a GaussianMixture
log_evidence = prior.log_evidence(A, sigma_y, y)  # exact log p(y)

key_prior, key_prior_exact, key_post, key_post_exact, key_mc = jax.random.split(
    jax.random.key(0), 5
)
n = 1000
prior_diffused = prior.reverse_sample(key_prior, (n,), num_steps=100)
prior_exact = prior.sample(key_prior_exact, (n,))
post_diffused = posterior.reverse_sample(key_post, (n,), num_steps=100)
post_exact = posterior.sample(key_post_exact, (n,))

# Monte Carlo check of the evidence: log E_prior[ N(y; A x, sigma_y^2) ].
x_mc = prior.sample(key_mc, (100_000,))
log_lik = jax.scipy.stats.norm.logpdf(y, x_mc @ A.T, sigma_y).sum(-1)
log_evidence_mc = jax.scipy.special.logsumexp(log_lik) - jnp.log(log_lik.shape[0])


def show(label, value, samples=None):
    """One row: a mean and, for samples, its Monte Carlo standard error."""
    row = f"{label:26s}" + " ".join(f"{float(c):+7.3f}" for c in value)
    if samples is not None:
        std_err = samples.std(0) / len(samples) ** 0.5
        row += "   (+/- " + " ".join(f"{float(c):.3f}" for c in std_err) + ")"
    print(row)


print("means of x")
show("prior, exact", prior.mean)
show("prior, exact samples", prior_exact.mean(0), prior_exact)
show("prior, reverse diffusion", prior_diffused.mean(0), prior_diffused)
show("posterior, exact", posterior.mean)
show("posterior, exact samples", post_exact.mean(0), post_exact)
show("posterior, reverse diff.", post_diffused.mean(0), post_diffused)
print("posterior weights:", " ".join(f"{float(w):.3f}" for w in posterior.weights))
print(f"log p(y): exact {float(log_evidence):.3f}, Monte Carlo {float(log_evidence_mc):.3f}")
