"""Bridges to other PEFT libraries' checkpoints (optional; none imports the other library).

* :mod:`liegroup.peft.interop.hira` — Hugging Face peft's HiRA (``W + W ⊙ (B·A)``), which is
  LieRA's first-order map: :func:`export_hira` writes a LieRA adapter as a HiRA checkpoint that
  ``peft.PeftModel.from_pretrained`` loads, :func:`import_hira` loads a HiRA checkpoint as a
  LieRA first-order adapter.

Example:
    >>> import tempfile, torch
    >>> from liegroup.peft import LieRAConfig, get_peft_model
    >>> from liegroup.peft.interop import export_hira, import_hira
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> m = get_peft_model(net, LieRAConfig(rank=2, target_modules=["0"],
    ...                                     exp_map="first_order"))
    >>> d = tempfile.mkdtemp()
    >>> export_hira(m, d)
    >>> back = import_hira(torch.nn.Sequential(torch.nn.Linear(4, 3)), d)
    >>> back.peft_config["default"].exp_map
    'first_order'
"""

from __future__ import annotations

from liegroup.peft.interop.hira import export_hira, import_hira

__all__ = ["export_hira", "import_hira"]
