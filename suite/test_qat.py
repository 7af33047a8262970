"""QAT (``qat_int8_row``): the four findings of the mlx-qat-ste review as checks a backend can fail.

1. Evaluation never fake-quantizes: the eval path is the float model on the master weights.
2. Every tensor the exporter stores as int8 is fake-quantized in training (the review's tied
   embedding; here the shared expert beside the routed ones), with exactly the exported values.
3. Tensors of at most ``qat_keep_float_max_numel`` (65,536) elements stay float in training, as in
   export: no training noise that the checkpoint will not have.
4. The clip rule is the same in training and export (a clip quantile applied on both sides).

And the round trip: the exported int8 model, loaded back, computes the fake-quantized training
forward — it is not quantized a second time.

A backend opts in with ``Capabilities(qat_export=True)`` and implements ``eval_forward(prepared, x) ->
ForwardResult``, ``export_int8(prepared) -> dict`` (``"{name}.int8"`` codes and ``"{name}.scale"`` scales
for the quantized projections, ``"{name}"`` floats otherwise),
``load_exported(spec, exported) -> prepared``, and ``prepare`` accepting a `qmoe.reference.Scheme` object
(``qat_int8_row`` with a clip quantile) for finding 4.

The ``check_*`` functions take a backend and raise `ConformanceError`; the tests call them, and
backend test modules may call them on mutants to show each check catches its finding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qmoe import reference
from qmoe.reference import MoEParams, MoESpec, get_scheme
from qmoe.reference.quantization import quantize_qat_rows
from qmoe.suite.cases import Case, CaseData
from qmoe.suite.checks import ConformanceError, assert_close, rerun_hint
from qmoe.suite.tolerances import tolerance

pytestmark = pytest.mark.conformance

SCHEME = "qat_int8_row"
#: Backends that declare the scheme and the QAT extras (see `qmoe.suite.plugin.REQUIREMENTS`).
SCHEMES_UNDER_TEST = (SCHEME,)
REQUIRES = ("qat_export",)
EXTRAS = ("eval_forward", "export_int8", "load_exported")

#: QAT cases need tensors on both sides of the 65,536-element threshold, which the fixed cases'
#: small shapes do not have: w13 = 4 x 64 x 320 = 81,920 and shared_w13 = 64 x 1,280 = 81,920 are
#: quantized at export; w2 = 40,960 and shared_w2 = 40,960 stay float.
MIXED = Case("qat_mixed", MoESpec(hidden=64, ffn=160, experts=4, top_k=2, shared_ffn=640), tokens=17, seed=21)
#: w13 = 4 x 64 x 256 = 65,536 exactly: at the threshold, so it stays float (the rule is "<=").
AT_THRESHOLD = Case("qat_at_threshold", MoESpec(hidden=64, ffn=128, experts=4, top_k=2), tokens=17, seed=22)
#: A clip quantile well inside the rows: clipping moves the scale, so a rule that differs between
#: training and export, or one applied twice, changes the values by whole steps.
CLIP_QUANTILE = 0.9




@pytest.fixture
def qat_backend(backend):
    """A backend that declares the QAT scheme and ``qat_export`` (others are not generated: see REQUIRES)."""
    return backend


def _data(backend, case: Case) -> CaseData:
    return case.build(backend.capabilities.dtypes[0])


def _exported_values(spec: MoESpec, exported: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every parameter as the checkpoint holds it: codes * scale where int8, the float otherwise."""
    values = {}
    for name in spec.param_shapes():
        if f"{name}.int8" in exported:
            values[name] = exported[f"{name}.int8"].astype(np.float64) * exported[f"{name}.scale"].astype(np.float64)
        elif name in exported:
            values[name] = np.asarray(exported[name], dtype=np.float64)
        else:
            raise ConformanceError(f"export_int8 has neither {name!r} nor {name + '.int8'!r}\n{rerun_hint()}")
    return values


def _tight(dtype: str) -> tuple[float, str]:
    tol = tolerance(SCHEME, dtype, "forward")
    return tol.tight, tol.reason


def _flat(a: np.ndarray) -> np.ndarray:
    """Rows of the last axis (per-row errors of a [.., in, out] weight are per input row)."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, a.shape[-1])


def _relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b)))


def _assert_codes_match(exported: dict[str, np.ndarray], name: str, given: np.ndarray, scheme, what: str) -> None:
    """Exported codes equal the reference exporter's (one apart only where the clipped value over the
    scale is a .5 tie as float32 sees it) and scales agree to 4 float32 ulps."""
    expected = quantize_qat_rows(given, scheme)
    codes = np.asarray(exported[f"{name}.int8"])
    scale = np.broadcast_to(np.asarray(exported[f"{name}.scale"], dtype=np.float64), expected.scale.shape)
    if codes.shape != expected.codes.shape:
        raise ConformanceError(f"{what}: codes shape {codes.shape}, expected {expected.codes.shape}\n{rerun_hint()}")
    if not np.allclose(scale, expected.scale, rtol=4 * 2**-24, atol=0):
        i = np.unravel_index(np.argmax(np.abs(scale - expected.scale)), scale.shape)
        raise ConformanceError(f"{what}: scale {scale[i]!r} vs reference {expected.scale[i]!r} at "
                               f"{tuple(int(v) for v in i)}\n{rerun_hint()}")
    magnitude = np.abs(given)
    clip_abs = (magnitude.max(axis=-2, keepdims=True) if scheme.qat_clip_quantile is None
                else np.quantile(magnitude, scheme.qat_clip_quantile, axis=-2, keepdims=True))
    ratio = np.clip(given, -clip_abs, clip_abs) / expected.scale
    off = np.abs(codes.astype(np.int64) - expected.codes.astype(np.int64))
    at_tie = np.abs(np.abs(ratio) % 1.0 - 0.5) <= 8 * 2**-24 * np.maximum(1, np.abs(ratio))
    bad = (off > 1) | ((off == 1) & ~at_tie)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise ConformanceError(f"{what}: code {int(codes[i])} vs reference {int(expected.codes[i])} at {i}"
                               f"\n{rerun_hint()}")


def check_eval_never_fake_quantizes(backend) -> None:
    """Finding 1: eval_forward is the float model on the masters (training fake-quantizes here)."""
    data = _data(backend, MIXED)
    tight, why = _tight(data.dtype)
    prepared = backend.prepare(data.spec, data.params, SCHEME, data.dtype)
    float_y = reference.forward(data.spec, data.params, data.x, "none").y
    fake_y = reference.forward(data.spec, data.params, data.x, SCHEME).y
    gap = _relative_gap(fake_y, float_y)
    assert gap > 100 * tight, f"case bug: fake quantization changes y by only {gap:.1e}"
    assert_close(np.asarray(backend.eval_forward(prepared, data.x).y), float_y, tight,
                 "eval_forward.y vs the float model (fake-quantized in evaluation?)", why)


def check_exported_tensors_fake_quantized(backend) -> None:
    """Findings 2 and 3: in training, a parameter is fake-quantized exactly when export stores it as
    int8, with the exported values; everything else is the master, exactly, on both sides."""
    for case in (MIXED, AT_THRESHOLD):
        data = _data(backend, case)
        tight, why = _tight(data.dtype)
        scheme = get_scheme(SCHEME)
        prepared = backend.prepare(data.spec, data.params, SCHEME, data.dtype)
        training = backend.effective_weights(prepared)
        exported = backend.export_int8(prepared)
        checkpoint = _exported_values(data.spec, exported)
        for name, given in data.params.items():
            expected = quantize_qat_rows(given, scheme) if name in ("w13", "w2", "shared_w13", "shared_w2") else None
            stored_int8 = f"{name}.int8" in exported
            what = f"{case.name}.{name} ({given.size} elements)"
            if expected is None:
                if stored_int8:
                    raise ConformanceError(f"{what}: exported as int8, but the exporter keeps it float "
                                           f"(<= {scheme.qat_keep_float_max_numel} elements, or never quantized)"
                                           f"\n{rerun_hint()}")
                for side, actual in (("training", training[name]), ("export", checkpoint[name])):
                    if not np.array_equal(np.asarray(actual, dtype=np.float64), given):
                        raise ConformanceError(f"{what}: stays float at export, but the {side} weights differ "
                                               f"from the master by up to {np.abs(actual - given).max():.3e} "
                                               f"(fake quant of a tensor export keeps float)\n{rerun_hint()}")
                continue
            if not stored_int8:
                raise ConformanceError(f"{what}: has more than {scheme.qat_keep_float_max_numel} elements but "
                                       f"export_int8 stores it as float\n{rerun_hint()}")
            _assert_codes_match(exported, name, given, scheme, f"{what}: export vs the reference exporter")
            assert_close(_flat(training[name]), _flat(checkpoint[name]), tight,
                         f"{what}: training weights vs the exported int8 values (not fake-quantized in training?)",
                         why)


def check_clip_rule_same_in_training_and_export(backend) -> None:
    """Finding 4: with a clip quantile, training, export and the reference exporter agree."""
    data = _data(backend, MIXED)
    tight, why = _tight(data.dtype)
    clipped = dataclasses.replace(get_scheme(SCHEME), qat_clip_quantile=CLIP_QUANTILE)
    prepared = backend.prepare(data.spec, data.params, clipped, data.dtype)
    training = backend.effective_weights(prepared)
    exported = backend.export_int8(prepared)
    checkpoint = _exported_values(data.spec, exported)
    for name in ("w13", "shared_w13"):
        given = getattr(data.params, name)
        # The case has teeth only if clipping changes the values well beyond the tolerance.
        gap = _relative_gap(quantize_qat_rows(given, clipped).dequantize(),
                            quantize_qat_rows(given, get_scheme(SCHEME)).dequantize())
        assert gap > 100 * tight, f"case bug: clip quantile {CLIP_QUANTILE} changes {name} by only {gap:.1e}"
        _assert_codes_match(exported, name, given, clipped, f"clip.{name}: export vs the reference exporter")
        assert_close(_flat(training[name]), _flat(checkpoint[name]), tight,
                     f"clip.{name}: training weights vs the clipped export (a different clip rule in training?)", why)


def check_round_trip_not_quantized_twice(backend) -> None:
    """Exported, loaded, evaluated: equals the fake-quantized training forward; the loaded model's
    weights are the checkpoint's values, not a second quantization of them."""
    data = _data(backend, MIXED)
    tight, why = _tight(data.dtype)
    clipped = dataclasses.replace(get_scheme(SCHEME), qat_clip_quantile=CLIP_QUANTILE)
    prepared = backend.prepare(data.spec, data.params, clipped, data.dtype)
    exported = backend.export_int8(prepared)
    checkpoint = _exported_values(data.spec, exported)
    twice = reference.effective_params(data.spec, MoEParams(**checkpoint), clipped)
    gap = _relative_gap(twice.w13, checkpoint["w13"])
    assert gap > 100 * tight, f"case bug: quantizing the checkpoint again changes w13 by only {gap:.1e}"
    loaded = backend.load_exported(data.spec, exported)
    loaded_weights = backend.effective_weights(loaded)
    for name, value in checkpoint.items():
        assert_close(_flat(loaded_weights[name]), _flat(value), tight,
                     f"round_trip.{name}: loaded weights vs checkpoint (quantized again on load?)", why)
    train_y = np.asarray(backend.forward(prepared, data.x).y)
    assert_close(np.asarray(backend.forward(loaded, data.x).y), train_y, tight,
                 "round_trip.y: loaded int8 model vs fake-quantized training forward", why)
    assert_close(np.asarray(backend.eval_forward(loaded, data.x).y), train_y, tight,
                 "round_trip.y: loaded int8 model's eval path vs training forward", why)


def test_eval_never_fake_quantizes(qat_backend):
    check_eval_never_fake_quantizes(qat_backend)


def test_exported_tensors_fake_quantized_in_training(qat_backend):
    check_exported_tensors_fake_quantized(qat_backend)


def test_clip_rule_same_in_training_and_export(qat_backend):
    check_clip_rule_same_in_training_and_export(qat_backend)


def test_round_trip_not_quantized_twice(qat_backend):
    check_round_trip_not_quantized_twice(qat_backend)
