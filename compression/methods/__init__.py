"""Every compression method; importing this package registers them all.

Adding a method touches four places: its module in this folder (found and imported here,
no list to edit), a Hydra config in ``experiments/conf/compression/``, its tests in
``tests/compression/``, and the method list of ``experiments/conf/experiment/high_ratio.yaml``
(``tests/experiments/test_high_ratio_config.py`` checks it). The registry's contract tests
and the sharded test (``tests/training/test_distributed.py``) run its first
``contract_examples()`` config without being told.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
