"""Root conftest: marks the repository root for pytest. The qmoe plugin itself (options, backend
selection, parametrization, benchmarks) loads through its ``pytest11`` entry point once qmoe is
installed (``pip install -e .``), here and in any other project."""
