"""Bounds computed from the case in hand: what the tolerance table's constants become for one input.

The table (`qmoe.suite.tolerances`) holds the constants and their reasons; here they meet the inputs:
the router's logit rounding of each token, and the effect of the int8 codes that a correct backend
may choose differently (`qmoe.reference.flip_envelope`). Tests ask for a bound by tensor name and get a
relative part per row and an absolute part per row, which `qmoe.suite.checks.assert_close` adds up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qmoe import reference
from qmoe.reference import FlipEnvelope, MoEParams, MoESpec
from qmoe.reference.flips import UNIT_ROUNDOFF, gate_cotangent_magnitude

from .tolerances import FLIP_SAFETY, FLOAT32_EPS, GATE_RELATIVE, LOGIT_ERROR_TERMS, ROUTER_VJP_ROUNDINGS, Tolerance


def effective_as_params(backend, prepared) -> MoEParams:
    """The backend's effective weights as MoEParams (the reference evaluates at them)."""
    weights = backend.effective_weights(prepared)
    return MoEParams(**{k: np.asarray(v, dtype=np.float64) for k, v in weights.items()})


def logit_error_bound(params: MoEParams, x: np.ndarray) -> np.ndarray:
    """[T, 1] the relative error a token's gate weights inherit from float32 logits.

    A gate is exp (or sigmoid) of a logit (difference), so an absolute logit error e is a relative
    gate error e; float32 logits err by about u * sum_i |x_i r_i| (two of them in a difference).
    Negligible for the fixed cases; generated layers with outliers reach logits of hundreds.
    """
    row_scale = (np.abs(x) @ np.abs(params.router)).max(axis=-1, keepdims=True)
    return LOGIT_ERROR_TERMS * FLOAT32_EPS * row_scale


def routing_undecided(spec: MoESpec, params: MoEParams, x: np.ndarray) -> np.ndarray:
    """[T] bool: tokens whose top-k boundary lies within a float32 router's rounding.

    The boundary is the lowest selected score against the best unselected one (softmax: logits;
    sigmoid: s + bias, whose error is at most a quarter of the logit's); within `logit_error_bound`
    two correct float32 programs may select differently — the layer on one device and its experts
    sharded, whose router GEMM has T/N rows and may be reassociated otherwise (cuBLAS picks per shape).
    An exact tie (gap 0) is decided: the lower index wins. Near-ties are rare (the logbook's zipf
    top-8 input: 4 of 32768 tokens) but a flipped selection moves a row by its gate's share.
    """
    tokens = x.shape[0]
    if spec.top_k >= spec.experts or tokens == 0:
        return np.zeros(tokens, dtype=bool)
    routing = reference.route(spec, params, np.asarray(x, dtype=np.float64))
    selection = np.asarray(routing.selection, dtype=np.float64)
    lowest = np.take_along_axis(selection, routing.expert_ids, axis=-1).min(axis=-1)
    unselected = selection.copy()
    np.put_along_axis(unselected, routing.expert_ids, -np.inf, axis=-1)
    gap = lowest - unselected.max(axis=-1)
    return (gap > 0) & (gap <= logit_error_bound(params, np.asarray(x, dtype=np.float64))[:, 0])


def gate_weight_bound(params: MoEParams, x: np.ndarray) -> np.ndarray:
    """[T, 1] relative error of a float32 router's gate weights: 1e-5 for the softmax/sigmoid and the
    renormalisation themselves, plus `logit_error_bound`."""
    return GATE_RELATIVE + logit_error_bound(params, x)


def router_vjp_scale(dtype: str) -> float:
    """The relative rounding of the router VJP's terms in a backend computing in ``dtype``."""
    return ROUTER_VJP_ROUNDINGS * UNIT_ROUNDOFF[dtype]


def router_vjp_rounding(scale: float, terms: np.ndarray, x: np.ndarray, router: np.ndarray,
                        name: str) -> np.ndarray | float:
    """What rounding inside d logits does to dR = x^T d logits (``router``: one norm) and to dx's router
    share d logits R^T (``x``: per token); 0 for other tensors.

    ``terms`` [T, E] are the router VJP's terms (`reference.gate_cotangent_magnitude`); a backend errs
    by ``scale`` (`router_vjp_scale`) times them, which a bound relative to the result misses where d logits is a
    cancellation (saturated gates, an outlier token).
    """
    if name == "router":
        return scale * float(np.linalg.norm(np.abs(x).T @ terms))
    if name == "x":
        return scale * np.linalg.norm(terms @ np.abs(router).T, axis=1)
    return 0.0


@dataclass(frozen=True)
class Bound:
    """``relative`` x ||reference row|| + ``absolute`` per row: what `assert_close` allows."""

    relative: np.ndarray | float
    absolute: np.ndarray | float
    reason: str


class CaseBounds:
    """The bounds of one comparison set: a tolerance entry evaluated at one layer, input and scheme."""

    def __init__(self, tol: Tolerance, spec: MoESpec, params: MoEParams, x: np.ndarray, scheme: str, dtype: str,
                 dy: np.ndarray | None = None, bypass: bool = False) -> None:
        self.tol = tol
        self.logit = logit_error_bound(params, x)
        routing = reference.route(spec, params, x)
        #: per expert, the largest logit term of the tokens it received (0 for an empty expert)
        self.expert_logit = np.array([self.logit[:, 0][np.any(routing.expert_ids == e, axis=-1)].max(initial=0.0)
                                      for e in range(spec.experts)])
        #: [T, E] the terms of each token's router VJP (None without dy: forward-only comparisons)
        self.router_terms = None if dy is None else gate_cotangent_magnitude(spec, params, x, dy, scheme)
        self.router = params.router
        self.vjp_scale = router_vjp_scale(dtype)
        self.x = x
        self.envelope: FlipEnvelope | None = None
        if tol.flip_aware and reference.get_scheme(scheme).quantized:
            self.envelope = reference.flip_envelope(spec, params, x, scheme, dtype, dy=dy,
                                                    gate_error=gate_weight_bound(params, x), bypass=bypass)

    def _flips(self, values: np.ndarray | None) -> np.ndarray | float:
        if values is None:
            return 0.0
        return FLIP_SAFETY * np.linalg.norm(values.reshape(values.shape[0], -1), axis=1)

    def _reason(self) -> str:
        if self.envelope is None:
            return self.tol.reason
        counts = ", ".join(f"{site} {n}" for site, n in self.envelope.flips.items() if n)
        return (f"{self.tol.reason}; possible int8 code flips in this case: {counts or 'none'} "
                f"(rows with one are held to {FLIP_SAFETY:g}x their computed effect on top)")

    def output(self) -> Bound:
        """y [T, H] by token: the tight bound, the gates' logit rounding (y is linear in them), the flips."""
        flips = self._flips(None if self.envelope is None else self.envelope.y)
        return Bound(self.tol.tight + self.logit[:, 0], flips, f"{self._reason()}; plus the gates' logit rounding")

    def expert_output(self, expert: int) -> Bound:
        """Bypass: expert ``expert``'s output on every token [T, H]."""
        env = None if self.envelope is None else self.envelope.expert_outputs
        return Bound(self.tol.tight, self._flips(None if env is None else env[expert]), self._reason())

    def _gradient_relative(self, name: str, expert: int | None) -> np.ndarray | float:
        """tight, plus what the gates' logit rounding does: every routed gradient is linear in the gates
        (and d logits in their derivatives), so a token's gate error is a relative error of its share;
        the shared expert's weights never meet a gate."""
        if name == "x":
            return self.tol.tight + self.logit[:, 0]
        if name == "router":
            return self.tol.tight + float(self.logit.max(initial=0.0))
        if expert is not None:
            return self.tol.tight + float(self.expert_logit[expert])
        return self.tol.tight

    def flip_allowance(self, name: str, expert: int | None = None) -> np.ndarray | float:
        """The possible int8 code flips' effect on a gradient (0 without an envelope), by row as `gradient`."""
        if self.envelope is None:
            return 0.0
        values = self.envelope.grads[name]
        if expert is not None:
            values = values[expert][None]
        elif name != "x":
            values = values[None]
        return self._flips(values)

    def gradient(self, name: str, expert: int | None = None) -> Bound:
        """A gradient: ``x`` by token, weight gradients by expert (``expert``) or whole, the router whole."""
        relative = self._gradient_relative(name, expert)
        reason = f"{self._reason()}; plus the gates' logit rounding and the router VJP's own rounding"
        vjp = 0.0 if self.router_terms is None else router_vjp_rounding(self.vjp_scale, self.router_terms, self.x,
                                                                        self.router, name)
        return Bound(relative, self.flip_allowance(name, expert) + vjp, reason)
