r"""A Gaussian mixture as a diffusion prior with exact everything: the ground truth of the tests.

Components share one orthonormal basis :math:`V` (the identity by default) and have diagonal
covariances in it, :math:`\Sigma_k = V \operatorname{diag}(v_k) V^T`. Under the forward process
the noised mixture is again a mixture,
:math:`p_t(x) = \sum_k w_k N(x; \alpha_t \mu_k, V \operatorname{diag}(\alpha_t^2 v_k + \sigma_t^2)
V^T)`, so Tweedie's denoiser is exact at every ``t`` for every schedule:

.. math::
    E[x_0 \mid x_t] = \sum_k r_k(x_t) \Big(\mu_k + V \operatorname{diag}\Big(\frac{\alpha_t
    v_k}{\alpha_t^2 v_k + \sigma_t^2}\Big) V^T (x_t - \alpha_t \mu_k)\Big),

with :math:`r_k` the posterior component probabilities. The posterior of a linear-Gaussian
observation :math:`y = A x + \sigma_y \varepsilon` under isotropic components is again such a
mixture, in the eigenbasis of :math:`A^T A` (:meth:`GaussianMixture.posterior`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from diffprior.diffusion.denoiser import Denoiser
from diffprior.diffusion.schedules import VP, Schedule
from diffprior.operators import LinearOperator
from diffprior.priors.diffusion_prior import DiffusionPrior
from diffprior.types import Array, ArrayLike, PRNGKey

__all__ = ["GaussianMixture"]

_LOG_2PI = float(np.log(2 * np.pi))
#: Largest dimension for which :meth:`GaussianMixture.variance_along` builds the dense
#: covariance of a mixture with general (non-isotropic) components.
_DENSE_MAX_DIM = 4096


def _check_entries(name: str, value: np.ndarray, expected: str, is_valid) -> None:
    """A ValueError naming ``name``, what its entries must be and the first bad one."""
    bad = ~is_valid(value)
    if np.any(bad):
        first = value[bad].ravel()[0] if value.ndim else value
        count = f" ({int(bad.sum())} of {bad.size} entries)" if value.size > 1 else ""
        raise ValueError(f"{name} must be {expected}, got {first}{count}")


class _MixtureNet(eqx.Module):
    """The exact ``x0`` denoiser of a Gaussian mixture (a network in ``"x0"`` form)."""

    means: Array  # (m, d)
    log_weights: Array  # (m,)
    variances: Array  # (m, d), in the basis
    basis: Array | None  # (d, d) orthonormal columns, or None for the identity
    means_in_basis: Array  # (m, d)
    schedule: Schedule

    def to_basis(self, x: Array) -> Array:
        return x if self.basis is None else x @ self.basis

    def from_basis(self, z: Array) -> Array:
        return z if self.basis is None else self.basis @ z

    def component_log_joint(self, z: Array, alpha: Array, sigma: Array) -> Array:
        """``log w_k + log N(x; alpha mu_k, diag(alpha^2 v_k + sigma^2))`` for ``z = V^T x``.

        Written with matrix products (the squares expanded) so that, vmapped over particles,
        the cost is two ``(N, d) x (d, m)`` products.
        """
        noised_var = alpha**2 * self.variances + sigma**2  # (m, d)
        precision = 1.0 / noised_var
        quad = (
            (z**2) @ precision.T
            - 2.0 * alpha * z @ (self.means_in_basis * precision).T
            + alpha**2 * jnp.sum(self.means_in_basis**2 * precision, axis=-1)
        )
        log_det = jnp.sum(jnp.log(noised_var), axis=-1)
        return self.log_weights - 0.5 * (quad + log_det + z.shape[-1] * _LOG_2PI)

    def __call__(self, x: Array, t: Array) -> Array:
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        z = self.to_basis(x)
        resp = jax.nn.softmax(self.component_log_joint(z, alpha, sigma))  # (m,)
        gain = alpha * self.variances / (alpha**2 * self.variances + sigma**2)  # (m, d)
        # sum_k r_k [mu_k + V diag(g_k) (z - alpha V^T mu_k)], in products over k
        correction = z * (resp @ gain) - alpha * (resp @ (gain * self.means_in_basis))
        return resp @ self.means + self.from_basis(correction)


class GaussianMixture(DiffusionPrior):
    r"""Mixture of Gaussians :math:`\sum_k w_k N(\mu_k, s_k^2 I)` with an exact denoiser,
    exact ``sample`` and ``log_prob``, and the exact posterior and evidence of linear-Gaussian
    observations.

    Parameters
    ----------
    means
        ``(m, d)`` component means.
    weights
        ``(m,)`` non-negative weights (normalised here).
    scale
        Component standard deviation: a scalar or one per component, ``(m,)``.
    schedule
        Noise schedule of the diffusion view (default ``VP.linear()``).
    local_variance
        Passed to the :class:`~diffprior.Denoiser`: by default the mean component variance, so
        that reverse steps add back the within-component spread of :math:`x_0` (this makes the
        discretised reverse chain close to the mixture even with few steps; 0 gives plain
        DDPM steps, as a generic network has).
    prior_options
        Other :class:`~diffprior.DiffusionPrior` options (``num_steps``, ``eta``, ...).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> import diffprior as dp
    >>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.5, 0.5]))
    >>> gmm.sample(jax.random.key(0), (4,)).shape
    (4, 2)
    >>> post = gmm.posterior(jnp.array([[1.0, 0.0]]), 0.5, jnp.array([1.9]))
    >>> bool(post.weights[1] > 0.99)
    True
    """

    def __init__(
        self,
        means: ArrayLike,
        weights: ArrayLike,
        scale: ArrayLike = 1.0,
        *,
        schedule: Schedule | None = None,
        validate_args: bool | None = None,
        **prior_options,
    ):
        means = jnp.asarray(means, dtype=jnp.float32)
        weights = jnp.asarray(weights, dtype=jnp.float32)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (m, d), got {means.shape}")
        m, d = means.shape
        if weights.shape != (m,):
            raise ValueError(f"weights must have shape ({m},) to match means, got {weights.shape}")
        scale = jnp.asarray(scale, dtype=jnp.float32)
        if scale.shape not in ((), (m,)):
            raise ValueError(f"scale must be a scalar or have shape ({m},), got {scale.shape}")
        # only concrete values can be checked: a mixture may be built under jit or vmap
        if not isinstance(means, jax.core.Tracer):
            _check_entries("means", np.asarray(means), "finite", np.isfinite)
        if not isinstance(weights, jax.core.Tracer):
            concrete = np.asarray(weights)
            _check_entries(
                "weights", concrete, "finite and non-negative", lambda w: np.isfinite(w) & (w >= 0)
            )
            if float(np.sum(concrete)) <= 0:
                raise ValueError(f"weights must not all be zero, got {concrete.tolist()}")
        if not isinstance(scale, jax.core.Tracer):
            _check_entries(
                "scale",
                np.asarray(scale),
                "finite and positive",
                lambda s: np.isfinite(s) & (s > 0),
            )
        variances = jnp.broadcast_to(jnp.reshape(scale**2, (-1, 1)), (m, d))
        log_weights = jnp.log(weights) - jnp.log(jnp.sum(weights))
        self._setup(means, log_weights, variances, None, schedule, validate_args, prior_options)

    def _setup(self, means, log_weights, variances, basis, schedule, validate_args, options):
        schedule = VP.linear() if schedule is None else schedule
        means_in_basis = means if basis is None else means @ basis
        net = _MixtureNet(means, log_weights, variances, basis, means_in_basis, schedule)
        local_variance = options.pop("local_variance", None)
        if local_variance is None:
            concrete = not isinstance(variances, jax.core.Tracer)
            local_variance = float(jnp.mean(variances)) if concrete else 0.0
        denoiser = Denoiser(net, schedule, "x0", local_variance=local_variance)
        DiffusionPrior.__init__(
            self, denoiser, (means.shape[1],), validate_args=validate_args, **options
        )

    @classmethod
    def from_components(
        cls,
        means: ArrayLike,
        log_weights: ArrayLike,
        variances: ArrayLike,
        basis: ArrayLike | None = None,
        *,
        schedule: Schedule | None = None,
        **prior_options,
    ) -> GaussianMixture:
        """Build from normalised ``log_weights (m,)``, ``variances (m, d)`` in an orthonormal
        ``basis (d, d)`` (columns; ``None`` for the identity)."""
        obj = cls.__new__(cls)
        means = jnp.asarray(means, dtype=jnp.float32)
        basis = None if basis is None else jnp.asarray(basis, dtype=jnp.float32)
        obj._setup(
            means,
            jnp.asarray(log_weights, dtype=jnp.float32),
            jnp.asarray(variances, dtype=jnp.float32),
            basis,
            schedule,
            None,
            prior_options,
        )
        return obj

    # -- the mixture's parameters, read from the exact network --------------------------------
    @property
    def _net(self) -> _MixtureNet:
        return self.denoiser.net_fn

    @property
    def means(self) -> Array:
        return self._net.means

    @property
    def log_weights(self) -> Array:
        return self._net.log_weights

    @property
    def weights(self) -> Array:
        return jnp.exp(self._net.log_weights)

    @property
    def variances(self) -> Array:
        """``(m, d)`` component variances in :attr:`basis`."""
        return self._net.variances

    @property
    def basis(self) -> Array | None:
        return self._net.basis

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def mean(self) -> Array:
        return self.weights @ self.means

    @property
    def covariance(self) -> Array:
        """The mixture's covariance ``(d, d)``: dense, so for small ``d`` only (:attr:`variance`
        and :meth:`variance_along` give its diagonal and its quadratic form without it)."""
        net = self._net
        d = self.means.shape[1]
        basis = jnp.eye(d) if net.basis is None else net.basis
        within = basis @ jnp.diag(self.weights @ net.variances) @ basis.T
        centred = self.means - self.mean
        return within + (centred.T * self.weights) @ centred

    @property
    def variance(self) -> Array:
        r"""Per-coordinate variance ``(d,)``, the diagonal of :attr:`covariance` without forming
        it: :math:`\sum_k w_k \operatorname{diag}(V \operatorname{diag}(v_k) V^T) + \sum_k w_k
        (\mu_k - \mu)^2`, the first term :math:`(V \odot V) \sum_k w_k v_k`."""
        net = self._net
        within = self.weights @ net.variances  # in the basis
        if net.basis is not None:
            within = (net.basis**2) @ within
        return within + self.weights @ (self.means - self.mean) ** 2

    def variance_along(self, project: Callable[[Array], Array]) -> Array:
        r"""The mixture's variance :math:`v_j^T \Sigma v_j` along ``r`` orthonormal directions
        :math:`v_j`, ``(r,)``, without the dense covariance for isotropic components.

        ``project`` is the linear map from a batch of vectors ``(k, d)`` to their coordinates
        ``(k, r)`` along the directions, :math:`x \mapsto (v_j^T x)_j`: an operator's ``V_T``
        (reshaping to its ``in_shape``), or ``lambda x: x @ basis`` for a ``(d, r)`` basis. For
        components :math:`N(\mu_k, s_k^2 I)` (as built by the constructor),

        .. math::  v^T \Sigma v = \sum_k w_k s_k^2 + \sum_k w_k (v^T (\mu_k - \mu))^2

        for a unit :math:`v`, which costs one ``project`` of the ``(m, d)`` centred means.
        General components (a posterior) need the dense covariance, built for ``d <= 4096``
        only; larger ``d`` raises a ValueError. (Under ``jax.jit`` with the mixture traced, a
        mixture without basis counts as isotropic, as in :meth:`posterior`.)

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> import diffprior as dp
        >>> gmm = dp.GaussianMixture(jnp.array([[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), jnp.ones(2))
        >>> A = dp.operators.Inpaint(jnp.array([True, False, True]))
        >>> gmm.variance_along(lambda x: A.V_T(x.reshape(-1, *A.in_shape))).tolist()
        [5.0, 1.0, 1.0]
        """
        net = self._net
        centred = self.means - self.mean
        if self._is_isotropic():
            offsets = jnp.asarray(project(centred))  # (m, r)
            return self.weights @ net.variances[:, 0] + self.weights @ offsets**2
        d = centred.shape[1]
        if d > _DENSE_MAX_DIM:
            raise ValueError(
                f"variance_along: this mixture has general (non-isotropic) components and "
                f"d = {d} > {_DENSE_MAX_DIM}; its variance along arbitrary directions needs the "
                f"dense (d, d) covariance. Use isotropic components N(mu_k, s_k^2 I), or "
                "`variance` for the per-coordinate variance"
            )
        directions = jnp.asarray(project(jnp.eye(d)))  # (d, r): row i is (v_j[i])_j
        return jnp.einsum("ir,ij,jr->r", directions, self.covariance, directions)

    # -- exact distribution --------------------------------------------------------------------
    def sample(self, key: PRNGKey, sample_shape: Sequence[int] = ()) -> Array:
        """Exact draws: a component by its weight, then a Gaussian draw."""
        sample_shape = tuple(sample_shape)
        net = self._net
        key_k, key_z = jax.random.split(key)
        k = jax.random.categorical(key_k, net.log_weights, shape=sample_shape)
        z = jax.random.normal(key_z, sample_shape + self.event_shape)
        offsets = jnp.sqrt(net.variances[k]) * z
        if net.basis is not None:
            offsets = offsets @ net.basis.T
        return net.means[k] + offsets

    def sample_reference(self, key: PRNGKey, sample_shape: Sequence[int] = ()) -> Array:
        r"""Exact draws of the noised marginal at ``t_max``,
        :math:`\alpha x_0 + \sigma \varepsilon` with :math:`x_0` from the mixture, so the
        reverse chains start where the forward process ends. (The generic
        :math:`N(0, (\alpha^2 + \sigma^2) I)` misses the offsets :math:`\alpha \mu_k`, which
        for far-apart means in high dimension shifts the mass between components.)"""
        key_x, key_e = jax.random.split(key)
        t_max = self.schedule.t_max
        x0 = self.sample(key_x, sample_shape)
        noise = jax.random.normal(key_e, x0.shape)
        return self.schedule.alpha(t_max) * x0 + self.schedule.sigma(t_max) * noise

    def log_prob(self, value: ArrayLike) -> Array:
        """Exact log density."""
        return self.marginal_log_prob(value, None)

    def marginal_log_prob(self, value: ArrayLike, t: ArrayLike | None) -> Array:
        r"""Exact log density of the noised marginal :math:`p_t` (``t=None``: the clean
        mixture, even for schedules whose :math:`\sigma(0) > 0`)."""
        value = jnp.asarray(value, dtype=jnp.float32)
        net = self._net
        if t is None:
            alpha, sigma = jnp.float32(1.0), jnp.float32(0.0)
        else:
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)

        def one(x):
            return logsumexp(net.component_log_joint(net.to_basis(x), alpha, sigma))

        flat = value.reshape((-1, self.dim))
        return jax.vmap(one)(flat).reshape(value.shape[:-1])

    # -- linear-Gaussian inverse problems -------------------------------------------------------
    def _is_isotropic(self) -> bool:
        r"""Whether every component is :math:`N(\mu_k, s_k^2 I)`: no basis and, where they are
        concrete, equal variances within each component."""
        net = self._net
        isotropic = net.basis is None
        if isotropic and not isinstance(net.variances, jax.core.Tracer):
            variances = np.asarray(net.variances)  # concrete even under jit when captured
            isotropic = bool(np.all(variances == variances[:, :1]))
        return isotropic

    def _check_problem(self, A, sigma_y, y):
        y = jnp.asarray(y, dtype=jnp.float32)
        sigma_y = jnp.asarray(sigma_y, dtype=jnp.float32)
        d = self.means.shape[1]
        if isinstance(A, LinearOperator):
            if A.in_dim != d:
                raise ValueError(
                    f"A must map vectors of dimension {d}, got an operator with in_shape "
                    f"{A.in_shape} ({A.in_dim} entries)"
                )
            if y.shape != tuple(A.out_shape):
                raise ValueError(
                    f"y must have shape {tuple(A.out_shape)} to match A, got {y.shape}"
                )
        else:
            A = jnp.asarray(A, dtype=jnp.float32)
            if A.ndim != 2 or A.shape[1] != d:
                raise ValueError(f"A must have shape (dy, {d}), got {A.shape}")
            if y.shape != (A.shape[0],):
                raise ValueError(f"y must have shape ({A.shape[0]},) to match A, got {y.shape}")
        if sigma_y.shape != ():
            raise ValueError(f"sigma_y must be a scalar, got shape {sigma_y.shape}")
        if not isinstance(sigma_y, jax.core.Tracer) and not float(sigma_y) > 0:
            raise ValueError(f"sigma_y must be positive, got {float(sigma_y)}")
        if not isinstance(y, jax.core.Tracer) and not np.isfinite(np.asarray(y)).all():
            bad = int((~np.isfinite(np.asarray(y))).sum())
            raise ValueError(f"y has {bad} NaN or inf entries; every observation must be finite")
        if not self._is_isotropic():
            raise NotImplementedError(
                "the exact posterior needs isotropic components, N(mu_k, s_k^2 I); this mixture "
                "has general covariances (is it already a posterior?)"
            )
        return A, sigma_y, y

    def _evidence_terms(self, A, sigma_y, y):
        """Per-component ``log w_k + log N(y; A mu_k, s_k^2 A A^T + sigma_y^2 I)``.

        In the left singular basis of ``A`` the residual ``y - A mu_k`` has independent
        coordinates of variance ``s_k^2 s_i^2 + sigma_y^2``; the part outside the coordinates
        at hand (orthogonal to the range of an operator ``A``) has variance ``sigma_y^2``.
        """
        net = self._net
        m = net.means.shape[0]
        if isinstance(A, LinearOperator):  # its structured SVD: nothing of size d x dy
            dy = A.out_dim
            resid = y[None] - A(net.means.reshape(m, *A.in_shape))  # (m, *out_shape)
            coords = A.U_T(resid)  # (m, in_dim), zero where s_i = 0
            outside = (resid - A.U(coords)).reshape(m, dy)
            s2 = A.singular_values**2
        else:
            dy = A.shape[0]
            u, s, _ = jnp.linalg.svd(A, full_matrices=True)
            s2 = jnp.zeros(dy).at[: s.shape[0]].set(s**2)
            coords = (y[None, :] - net.means @ A.T) @ u  # (m, dy): every direction
            outside = jnp.zeros((m, 0))
        scale2 = net.variances[:, 0]  # (m,)
        cov_diag = scale2[:, None] * s2[None, :] + sigma_y**2  # (m, n) in the U basis
        quad = jnp.sum(coords**2 / cov_diag, axis=-1) + jnp.sum(outside**2, axis=-1) / sigma_y**2
        # the n coordinates and the dy - n others (n may exceed dy: zero padding, s_i = 0)
        log_det = jnp.sum(jnp.log(cov_diag), axis=-1) + (dy - s2.shape[0]) * jnp.log(sigma_y**2)
        return net.log_weights - 0.5 * (quad + log_det + dy * _LOG_2PI)

    def log_evidence(
        self, A: ArrayLike | LinearOperator, sigma_y: ArrayLike, y: ArrayLike
    ) -> Array:
        r"""Exact :math:`\log p(y)` for :math:`y = A x + \sigma_y \varepsilon`, :math:`x` from
        this mixture.

        ``A`` is a ``(dy, d)`` matrix, or a :class:`~diffprior.operators.LinearOperator` with
        ``in_dim == d`` (``y`` then shaped ``A.out_shape``), whose structured SVD is used: for an
        image-sized ``d`` nothing of size ``d x dy`` is built.
        """
        A, sigma_y, y = self._check_problem(A, sigma_y, y)
        return logsumexp(self._evidence_terms(A, sigma_y, y))

    def posterior(
        self, A: ArrayLike | LinearOperator, sigma_y: ArrayLike, y: ArrayLike
    ) -> GaussianMixture:
        r"""The exact posterior :math:`p(x \mid y)` of :math:`y = A x + \sigma_y \varepsilon`.

        Component :math:`k` has precision :math:`I/s_k^2 + A^T A/\sigma_y^2`, diagonal in the
        eigenbasis :math:`V` of :math:`A^T A` (right singular vectors of :math:`A`), mean
        :math:`\Sigma_k(\mu_k/s_k^2 + A^T y/\sigma_y^2)` and weight proportional to
        :math:`w_k N(y; A\mu_k, s_k^2 A A^T + \sigma_y^2 I)`. The result keeps this mixture's
        schedule, so it is itself a diffusion prior with an exact denoiser.

        ``A`` is as in :meth:`log_evidence`; an operator is used through its dense
        :meth:`~diffprior.operators.LinearOperator.matrix`, as the posterior's ``(d, d)`` basis
        is dense anyway (small ``d`` only).
        """
        A, sigma_y, y = self._check_problem(A, sigma_y, y)
        if isinstance(A, LinearOperator):
            A, y = A.matrix(), y.reshape(-1)
        net = self._net
        d = self.means.shape[1]
        u, s, vt = jnp.linalg.svd(A, full_matrices=True)
        basis = vt.T  # (d, d)
        rank = s.shape[0]
        eig = jnp.zeros(d).at[:rank].set(s**2)  # eigenvalues of A^T A
        # V^T A^T y = diag(s) U^T y, exactly zero off the range (A^T y / sigma_y^2 formed
        # directly leaks float32 rounding of size |A^T y| / sigma_y^2 into those directions)
        data_in_basis = jnp.zeros(d).at[:rank].set(s * (u.T @ y)[:rank])
        scale2 = net.variances[:, :1]  # (m, 1)
        sigma2 = sigma_y**2
        # precision 1/s_k^2 + eig/sigma_y^2, written without 1/sigma_y^2 (near-noiseless y)
        denom = sigma2 + scale2 * eig[None, :]  # (m, d)
        post_var = scale2 * sigma2 / denom  # (m, d) in the basis
        post_means_in_basis = (sigma2 * (net.means @ basis) + scale2 * data_in_basis) / denom
        post_means = post_means_in_basis @ basis.T
        terms = self._evidence_terms(A, sigma_y, y)
        log_weights = terms - logsumexp(terms)
        return GaussianMixture.from_components(
            post_means,
            log_weights,
            post_var,
            basis,
            schedule=self.schedule,
            num_steps=self.num_steps,
            eta=self.eta,
            spacing=self.spacing,
            local_variance=self.denoiser.local_variance,
        )
