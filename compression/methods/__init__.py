"""Every compression method; importing this package registers them all.

Adding a method touches its module in this folder (found and imported here, no list to
edit) and its tests in ``tests/compression/``. Everything else comes from the registry:
Hydra's ``compression=<name>`` composes from the config dataclass's defaults (put in the
ConfigStore by ``experiments.config``; a YAML in ``experiments/conf/compression/`` only for
a named variant, or to document the defaults), the high-ratio study's glob over that group
sweeps it, and the registry's contract tests and the sharded test
(``tests/training/test_distributed.py``) run its first ``contract_examples()`` config
without being told. ``signed_hashing.py`` was added this way.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
