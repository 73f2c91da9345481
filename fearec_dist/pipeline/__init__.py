"""Continuous training: ``fearec-dist daily`` (``daily.py``: append, warm start, train, export,
compare, promote), the promotion pointer and its history (``pointer.py``), and the scoring of
two exports on the same test rows (``compare.py``). docs/daily.md describes the loop."""
