"""fearec-dist: distributed training of FEARec and other sequential recommenders on Ray."""

__version__ = "0.1.0"
