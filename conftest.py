"""Root conftest: loads the qmoe pytest plugin (options, backend selection, parametrization)."""

pytest_plugins = ["suite.plugin", "suite.benchmarks.plugin"]
