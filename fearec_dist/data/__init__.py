"""The data room: raw logs -> prepared datasets (``prepare``), training examples, the Ray datasets
a run trains on (``datasets``) and the per-worker training feed (``feed``)."""
