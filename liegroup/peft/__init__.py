"""Structure-preserving parameter-efficient fine-tuning (LieRA) on top of :mod:`liegroup`.

This subpackage imports :mod:`liegroup`; the reverse never happens.
"""
