"""The project's own tests are qmoe tests: they activate the plugin (the frameworks' environment for CPU
runs, the hypothesis profile) as collecting a suite module would."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from qmoe.suite.plugin import activate

    activate(config)
