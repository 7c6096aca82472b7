"""embcomp recsys: data pipelines, CTR models and training."""

import sys

if sys.version_info >= (3, 14):  # pragma: no cover
    # On 3.14 the standard library's own `compression` package is found before this
    # project's, so `import compression` would silently load the wrong package.
    raise ImportError(
        "embcomp needs Python < 3.14: Python 3.14's standard library has a package named "
        "'compression' that shadows this project's (see README, 'Python 3.14')"
    )
