"""
The on-disk format (datafiles.py): batches drawn from it never cross documents.
"""
import numpy as np

from datafiles import get_batch, sample_windows

def test_batches_never_cross_documents():
    offsets = np.cumsum([0, 3, 1 + 1, 40, 7, 2, 25])
    # row = its doc id
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)).astype(np.float32)[:, None]
    rng = np.random.default_rng(0)
    starts, ends, first = sample_windows(rng, offsets, 500, 8)
    x, y, mask, eot = get_batch(rows, starts, ends, first, 8)
    doc_of_start = rows[starts, 0]
    for i in range(500):
        real = mask[i]
        assert real.any()
        assert (x[i, :, 0][real] == doc_of_start[i]).all()
        assert (y[i, :, 0][real] == doc_of_start[i]).all()
    assert mask.sum(1).max() == 8  # long documents fill the window
