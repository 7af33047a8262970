"""The README's "Add a backend" example, as an installable package.

One class: declare what it can do (`capabilities`), implement `prepare`, `forward` and
`effective_weights`; NumPy in, NumPy out. The suite generates only the combinations declared here
(scheme ``none``, the forward pass, float32) and skips the rest as not applicable.

This example shows the interface, not a kernel: `forward` defers to qmoe's float64 reference. A real
backend converts the NumPy inputs to its own arrays in `prepare`/`forward`, runs its kernels, and
returns NumPy. ``qmoe.implementations.torch_eager`` is a worked example of a real one.
"""

from __future__ import annotations

import numpy as np

from qmoe import reference
from qmoe.implementations import Backend, Capabilities


class MyBackend(Backend):
    name = "my_backend"
    capabilities = Capabilities(schemes=("none",), passes=("forward",), dtypes=("float32",))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None  # or e.g. "mylib is not installed": the suite then skips this backend, saying why

    def prepare(self, spec, params, scheme, dtype, ep_size=1):
        reference.get_scheme(scheme)  # a clear error for an unknown scheme
        params.validate(spec)  # a clear error for a wrong shape
        return spec, params.map(lambda a: a.astype(np.float32))

    def forward(self, prepared, x):
        spec, p = prepared
        reference.validate_input(spec, x)  # NaN / shape errors that name the problem
        # ... your kernels here; this example computes in float64 from the float32 weights and inputs:
        return reference.forward(spec, p.map(np.float64), x.astype(np.float32).astype(np.float64))

    def effective_weights(self, prepared):
        # The float weights forward computes with: here the float32 copies made in prepare.
        return prepared[1].map(np.float64).as_dict()
