"""UniPC (predictor + corrector, B(h) variants) equal to ``HeliosScheduler.step_unipc``.

Every scalar of UniPC (log-SNR steps, phi functions, the rho solve, the effective order, whether
the corrector runs) depends only on the schedule, so ``unipc_table`` computes them on the host in
the schedule's dtype, as the reference does with its 0-d tensors. The device step is then a few
fused multiply-adds over the latents and the model-output history, in the reference's order of
operations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from helios_jax.sampling.schedule import HeliosSchedulerConfig, Schedule


class UniPCTable(NamedTuple):
    """Per-step UniPC coefficients, each with a leading step axis; ``K = solver_order``.

    ``alpha``/``sigma`` convert the model output (``raw_sigma`` for flow prediction). ``p_*`` is the
    predictor from sigma[i] to sigma[i+1], ``c_*`` the corrector of the previous predictor step,
    applied when ``use_corrector``. ``*_rks``/``*_rhos`` (K-1 columns) weight the history
    differences; unused columns have rho 0 and rk 1.
    """

    raw_sigma: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    p_ratio: np.ndarray
    p_m0: np.ndarray
    p_res: np.ndarray
    p_rks: np.ndarray
    p_rhos: np.ndarray
    use_corrector: np.ndarray
    c_ratio: np.ndarray
    c_m0: np.ndarray
    c_res: np.ndarray
    c_rks: np.ndarray
    c_rhos: np.ndarray
    c_rho_t: np.ndarray


class UniPCState(NamedTuple):
    """Multistep history: the last ``K`` converted model outputs (oldest first) and the sample the
    last predictor started from (the corrector's ``last_sample``)."""

    model_outputs: jax.Array
    last_sample: jax.Array


def _alpha_sigma(config: HeliosSchedulerConfig, sigma: np.floating) -> tuple[np.floating, np.floating]:
    if config.use_flow_sigmas:
        return 1 - sigma, np.maximum(sigma, sigma.dtype.type(1e-8))
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lambda(config: HeliosSchedulerConfig, sigma: np.floating) -> np.floating:
    alpha, sigma_t = _alpha_sigma(config, sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma_t)


class _Update(NamedTuple):
    """One update: ``ratio * x - m0 * m_0 - res * sum_k rhos[k] * (m_k - m_0) / rks[k]``."""

    ratio: float
    m0: float
    res: float
    rks: np.ndarray
    rhos: np.ndarray  # the corrector's has one more entry, the weight of the new model output

    def padded(self, width: int) -> tuple:
        """The history columns padded to ``width`` (rk 1, rho 0: no contribution)."""
        rhos = self.rhos[: len(self.rks)]
        return (self.ratio, self.m0, self.res, np.concatenate([self.rks, np.ones(width - len(self.rks))]),
                np.concatenate([rhos, np.zeros(width - len(rhos))]))


_NO_CORRECTOR = _Update(1.0, 0.0, 0.0, np.zeros(0), np.zeros(1))


def _update_coefficients(config: HeliosSchedulerConfig, sigmas: np.ndarray, target: int, source: int,
                         history: list[int], corrector: bool) -> _Update:
    """Coefficients of one UniP (``corrector=False``) or UniC update from ``sigmas[source]`` to
    ``sigmas[target]`` with earlier points ``sigmas[history]``; the reference's
    ``multistep_uni_{p,c}_bh_update`` scalar work, in the same dtype."""
    alpha_t, sigma_t = _alpha_sigma(config, sigmas[target])
    alpha_s0, sigma_s0 = _alpha_sigma(config, sigmas[source])
    lambda_s0 = _lambda(config, sigmas[source])
    h = _lambda(config, sigmas[target]) - lambda_s0
    with np.errstate(divide="ignore", invalid="ignore"):
        rks = [(_lambda(config, sigmas[j]) - lambda_s0) / h for j in history]
        order = len(history) + 1
        dtype = sigmas.dtype.type
        hh = -h if config.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if config.solver_type == "bh1" else np.expm1(hh)
        powers, b, factorial = [], [], 1
        all_rks = np.array([*rks, 1.0], dtype)
        for i in range(1, order + 1):
            powers.append(all_rks ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, b = np.stack(powers), np.array(b, dtype)
        if corrector:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
        elif order == 1:
            rhos = np.zeros(0)
        else:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
        if config.predict_x0:
            ratio, m0, res = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h
        else:
            ratio, m0, res = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h
    return _Update(ratio, m0, res, np.array(rks, dtype), rhos.astype(np.float32))


def unipc_table(schedule: Schedule) -> UniPCTable:
    """The per-step coefficients of a whole UniPC trajectory over ``schedule`` (float32)."""
    config = schedule.config
    if not isinstance(config, HeliosSchedulerConfig):
        raise ValueError(f"UniPC needs a HeliosScheduler config; got {type(config).__name__}")
    sigmas, n, k = schedule.sigmas, schedule.num_steps, config.solver_order
    rows, previous_order = [], None
    for i in range(n):
        alpha, sigma = _alpha_sigma(config, sigmas[i])
        # The reference's effective order: warm up from 1, and lower it at the end if asked to.
        order = min(k, n - i) if config.lower_order_final else k
        order = min(order, min(i, k) + 1)
        predictor = _update_coefficients(config, sigmas, i + 1, i, [i - j for j in range(1, order)], corrector=False)
        use_corrector = i > 0 and (i - 1) not in config.disable_corrector
        corrector = _NO_CORRECTOR if i == 0 else _update_coefficients(
            config, sigmas, i, i - 1, [i - 1 - j for j in range(1, previous_order)], corrector=True)
        rows.append((sigmas[i], alpha, sigma, *predictor.padded(k - 1), use_corrector, *corrector.padded(k - 1),
                     corrector.rhos[-1]))
        previous_order = order
    columns = [np.array(column) for column in zip(*rows)]
    return UniPCTable(*(c if c.dtype == bool else c.astype(np.float32) for c in columns))


def unipc_init(sample: jax.Array, solver_order: int) -> UniPCState:
    """The empty history at the start of a stage (the reference resets it in ``set_timesteps``)."""
    return UniPCState(jnp.zeros((solver_order, *sample.shape), jnp.float32), jnp.zeros(sample.shape, jnp.float32))


def convert_model_output(model_output: jax.Array, sample: jax.Array, row: UniPCTable, *,
                         prediction_type: str = "flow_prediction", predict_x0: bool = True) -> jax.Array:
    """The data (``predict_x0``) or noise prediction UniPC works with, from the model's output."""
    alpha, sigma = row.alpha, row.sigma
    if predict_x0:
        if prediction_type == "flow_prediction":
            return sample - row.raw_sigma * model_output
        if prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        if prediction_type == "sample":
            return model_output
        return alpha * sample - sigma * model_output  # v_prediction
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha * model_output) / sigma
    return alpha * model_output + sigma * sample  # v_prediction


def _weighted_differences(rks: jax.Array, rhos: jax.Array, history: jax.Array, m0: jax.Array) -> jax.Array:
    """sum_k rhos[k] * (history[-(k+2)] - m0) / rks[k], the reference's ``einsum`` over ``D1s``."""
    total = jnp.zeros_like(m0)
    for k in range(rks.shape[0]):
        term = rhos[k] * ((history[-(k + 2)] - m0) / rks[k])
        total = term if k == 0 else total + term
    return total


def unipc_step(row: UniPCTable, state: UniPCState, model_output: jax.Array, sample: jax.Array, *,
               prediction_type: str = "flow_prediction", predict_x0: bool = True
               ) -> tuple[jax.Array, UniPCState]:
    """One ``step_unipc``: convert, correct the last predictor step, then predict the next sample.

    ``row`` is one step of ``unipc_table`` (index it, or let ``lax.scan`` slice it).
    """
    sample = sample.astype(jnp.float32)
    converted = convert_model_output(model_output, sample, row, prediction_type=prediction_type,
                                     predict_x0=predict_x0).astype(jnp.float32)
    history = state.model_outputs
    m0 = history[-1]
    corrected = row.c_ratio * state.last_sample - row.c_m0 * m0
    corrected = corrected - row.c_res * (
        _weighted_differences(row.c_rks, row.c_rhos, history, m0) + row.c_rho_t * (converted - m0)
    )
    sample = jnp.where(row.use_corrector, corrected, sample)

    history = jnp.concatenate([history[1:], converted[None]], axis=0)
    predicted = row.p_ratio * sample - row.p_m0 * converted
    predicted = predicted - row.p_res * _weighted_differences(row.p_rks, row.p_rhos, history, converted)
    return predicted, UniPCState(history, sample)
