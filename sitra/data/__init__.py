"""Corpora, tokenisation, masking and resumable batching."""
from sitra.data.causal import CausalCollator, causal_texts, lm_corpus, pack, shifted
from sitra.data.cells import (
    BucketedMLMCollator,
    CellExamples,
    H5ad,
    load_corpus,
    split_cells,
)
from sitra.data.mlm import Batches, LengthGroupedBatches, MLMCollator, example_generator, pad, tokenize_lines
from sitra.data.text import BUILTIN, load_texts, python_docs_paragraphs, take_fraction
