"""A planted violation for tests/unit/test_import_rules.py: importing this module loads DeepSpeed indirectly."""

import json  # noqa: F401  (a harmless import first, as real modules have)

import deepspeed  # noqa: F401
