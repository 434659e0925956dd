"""Nothing a user is handed runs code: pickled gene dictionaries are read as plain data only."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from sitra.data.cells import load_gene_dictionaries, read_plain_pickle
from sitra.errors import UsageError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "token_dictionary.pkl"
    evil.write_bytes(pickle.dumps({"ENSG0001": Payload(marker)}))
    good = tmp_path / "medians.pkl"
    good.write_bytes(pickle.dumps({"ENSG0001": 1.5}))
    with pytest.raises(UsageError, match=r"--token_dictionary .*: not a readable pickle \(UnpicklingError\)"):
        load_gene_dictionaries(str(evil), str(good))
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the same bytes with the plain unpickler: the payload does run
    assert marker.exists()


def test_plain_dicts_with_numpy_scalars_load(tmp_path):
    d = {"ENSG0001": np.float64(2.5), "ENSG0002": np.int64(3), "ENSG0003": 7}
    for protocol in (2, 4, 5):
        path = tmp_path / f"d{protocol}.pkl"
        path.write_bytes(pickle.dumps(d, protocol=protocol))
        assert read_plain_pickle(path) == d


def test_a_dict_of_other_things_is_refused(tmp_path):
    bad = tmp_path / "t.pkl"
    bad.write_bytes(pickle.dumps({1: 2}))
    good = tmp_path / "m.pkl"
    good.write_bytes(pickle.dumps({"ENSG0001": 1.5}))
    with pytest.raises(UsageError, match="expected gene id"):
        load_gene_dictionaries(str(bad), str(good))


def test_geneformers_own_dictionaries_load():
    if not (SHARED / "token_dictionary_gc30M.pkl").exists():
        pytest.skip("../shared/data/geneformer is absent (a fresh clone)")
    tokens, medians = load_gene_dictionaries(str(SHARED / "token_dictionary_gc30M.pkl"),
                                             str(SHARED / "gene_median_dictionary_gc30M.pkl"))
    assert len(tokens) == 25_426 and tokens["<pad>"] == 0 and tokens["<mask>"] == 1 and len(medians) == 25_424
