"""Op declarations, one module per family. Importing this package registers every op."""

from __future__ import annotations

from . import (  # noqa: F401
    activation,
    elementwise,
    fused,
    int_conv,
    nn,
    norm,
    pool,
    qops,
    qtables,
    quant,
    reduce,
    resample,
    tensor,
)
