"""Every compression method; importing this package registers them all.

Adding a method: its module in this folder (found and imported here, no list to edit),
a Hydra config in ``experiments/conf/compression/``, its tests in ``tests/compression/``,
and its sharded config in ``tests/training/test_distributed.py`` (a test checks it).
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
