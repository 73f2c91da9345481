"""Serving what was trained: export a run, recommend from the export, batch-recommend on Ray Data.

- ``artifact.py``: the export directory's layout, ``load_export`` and its checks.
- ``export.py``: ``export_run`` (checkpoint -> items.parquet, encoder.pt2, manifest, index).
- ``index.py``: the FAISS indexes (inner product) and their defaults.
- ``recommend.py``: raw ids -> internal ids -> encoder -> exact or ANN top-k -> raw ids.
- ``batch.py``: the Ray Data batch job (actors, Parquet in and out).
- ``cli.py``: the ``export`` and ``recommend`` commands.

See docs/serving.md.
"""
