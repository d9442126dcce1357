"""Root pytest settings: modules of optional extras are not collected where the extra is missing."""

from __future__ import annotations

import importlib.util

# liegroup.peft.interop.trainer subclasses transformers.Trainer (the `hf` extra); its doctests
# run where transformers is installed
collect_ignore = (
    [] if importlib.util.find_spec("transformers") else ["liegroup/peft/interop/trainer.py"]
)
