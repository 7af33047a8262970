"""The project's own tests are qmoe tests: they activate the plugin (the frameworks' environment for CPU
runs, the hypothesis profile) as collecting a suite module would."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from qmoe.suite.plugin import activate

    activate(config)


@pytest.fixture(scope="module")
def interpret(request: pytest.FixtureRequest) -> bool:
    """Where the Pallas kernels' tests (`test_jax_pallas_*`) run their kernels: through Triton where the run's
    device is a GPU, else in Pallas's interpreter. Interpreted on a GPU, a kernel is an XLA program run there, not
    what the layer runs (on the H200, jax 0.11, XLA's int8 dots of the interpreted grouped GEMM at 128-row tiles
    summed every product twice)."""
    import jax

    from qmoe.implementations.jax_prequant import env

    device = request.config.getoption("--device") or "cpu"
    on_gpu = device in env.GPU_PLATFORMS and jax.default_backend() == "gpu"
    if device in env.GPU_PLATFORMS and not on_gpu:
        pytest.skip(f"--device {device}: jax sees no GPU")
    return not on_gpu
