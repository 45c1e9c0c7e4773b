"""Interoperability with other attribution libraries (zennit)."""
from .zennit import (ZennitCompositeRule, ZennitRule, apply_zennit_canonizers, is_zennit_canonizer,
                     is_zennit_composite, is_zennit_hook)

__all__ = ["ZennitRule", "ZennitCompositeRule", "apply_zennit_canonizers", "is_zennit_hook", "is_zennit_canonizer",
           "is_zennit_composite"]
