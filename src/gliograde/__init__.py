"""gliograde: 3D CNNs that grade gliomas (HGG vs LGG) from multi-modal BraTS MRI."""

__version__ = "0.1.0"

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""Channel order of every cache, batch and checkpoint."""

GRADES = ("LGG", "HGG")
"""Index = label: LGG = 0, HGG = 1 (HGG is the positive class)."""
