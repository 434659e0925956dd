"""Peak memory of tokenize_cells on a large .h5ad file, against reading the file whole first.

Builds, in a temporary folder, an .h5ad of --cells cells x --genes genes of sparse counts (CSR,
written chunk by chunk through anndata, about --genes_per_cell expressed genes a cell, Ensembl ids
as the var index) and Geneformer-style dictionaries for its genes; then, each in a fresh Python
process, measures the peak resident memory (ru_maxrss, which counts the pages of files a process maps,
e.g. the corpus datasets copies into place) and the peak anonymous memory (heap and arrays,
sampled every 20 ms: what must fit in RAM) of:

- imports: the libraries the job imports, and nothing else (the floor under both runs);
- tokenize_cells: the job itself (anndata backed mode, --chunk_size cells at a time);
- read whole: the naive way, anndata.read_h5ad(file) into memory, then the same rank-value
  encoding over it chunk by chunk (no corpus is written).

The matrix's in-memory size is its data + indices + indptr arrays as anndata returns them.

Run (about 5 minutes on 2 busy CPU cores):

    python benchmarks/h5ad_memory.py

Quick smoke test:

    python benchmarks/h5ad_memory.py --cells 20000
"""
import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# every child samples its anonymous memory (RssAnon: heap and arrays, what must fit in RAM) while it
# runs, and prints it with its peak RSS, which also counts pages of files it maps (reclaimable)
SAMPLER = """
import json, resource, threading, time
anon = [0]
def sample():
    while True:
        line = next(l for l in open("/proc/self/status") if l.startswith("RssAnon"))
        anon[0] = max(anon[0], int(line.split()[1]) / 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
"""
PEAK = ("time.sleep(0.05); print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
        "'anon_mb': anon[0]}))")
IMPORTS = SAMPLER + "import anndata, datasets, scipy.sparse; from sitra.recipes import tokenize_cells\n"
READ_WHOLE = IMPORTS + """
import pickle, sys
import numpy as np
from sitra.data.cells import gene_map, rank_value_encode
path, tokens, medians, chunk = sys.argv[1], pickle.load(open(sys.argv[2], "rb")), pickle.load(open(sys.argv[3], "rb")), int(sys.argv[4])
adata = anndata.read_h5ad(path)
M, tok, med, _, _ = gene_map(np.asarray(adata.var_names), tokens, medians)
cells = 0
for start in range(0, adata.n_obs, chunk):
    part = adata.X[start:start + chunk].astype(np.float64)
    cells += sum(len(c) > 0 for c in rank_value_encode(part, M, tok, med, 2048))
print("cells", cells)
"""


def write_h5ad(path: Path, n_cells: int, n_genes: int, per_cell: int, seed: int, chunk: int = 2_000) -> int:
    """The .h5ad, written CSR chunk by chunk (anndata's write_elem, then appends to its backed
    dataset), so building it never holds the whole matrix. Returns the in-memory size of X in bytes."""
    import anndata
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    popularity = rng.gamma(0.5, 1.0, n_genes)
    expressed = np.minimum(1.0, per_cell * popularity / popularity.sum())  # chance a cell expresses each gene
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        anndata.io.write_elem(f, "obs", pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]))
        anndata.io.write_elem(f, "var", pd.DataFrame(index=[f"ENSG{k:011d}" for k in range(n_genes)]))
        for start in range(0, n_cells, chunk):
            rows = min(chunk, n_cells - start)
            counts = np.where(rng.random((rows, n_genes)) < expressed, rng.geometric(0.4, (rows, n_genes)), 0)
            m = sp.csr_matrix(counts.astype(np.float32))
            if start == 0:
                anndata.io.write_elem(f, "X", m)
            else:
                anndata.io.sparse_dataset(f["X"]).append(m)
        return sum(f["X"][k].size * f["X"][k].dtype.itemsize for k in ("data", "indices", "indptr"))


def measure(code: str, *argv) -> tuple[dict, float, str]:
    """(peak memory, seconds, stdout) of `code` run in a fresh interpreter."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code + "\n" + PEAK, *map(str, argv)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1]), time.time() - t0, out.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2_500)
    p.add_argument("--genes_per_cell", type=int, default=600)
    p.add_argument("--chunk_size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        x_bytes = write_h5ad(tmp / "cells.h5ad", a.cells, a.genes, a.genes_per_cell, a.seed)
        rng = np.random.default_rng(a.seed)
        ids = [f"ENSG{k:011d}" for k in range(a.genes)]
        (tmp / "t.pkl").write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1} | {g: k + 2 for k, g in enumerate(ids)}))
        (tmp / "m.pkl").write_bytes(pickle.dumps({g: float(rng.uniform(0.5, 3)) for g in ids}))
        print(f"built {a.cells:,} cells x {a.genes:,} genes in {time.time() - t0:.0f} s: file "
              f"{(tmp / 'cells.h5ad').stat().st_size / 2**20:,.0f} MB, X in memory {x_bytes / 2**20:,.0f} MB")
        floor, _, _ = measure(IMPORTS)
        job = (IMPORTS + "import sys\ntokenize_cells.run(tokenize_cells.TokenizeCellsArgs(h5ad=sys.argv[1], output=sys.argv[2], "
               "token_dictionary=sys.argv[3], gene_median_dictionary=sys.argv[4], chunk_size=int(sys.argv[5])))")
        ours, t_ours, printed = measure(job, tmp / "cells.h5ad", tmp / "corpus", tmp / "t.pkl", tmp / "m.pkl", a.chunk_size)
        whole, t_whole, _ = measure(READ_WHOLE, tmp / "cells.h5ad", tmp / "t.pkl", tmp / "m.pkl", a.chunk_size)
    print("\n".join(printed.strip().splitlines()[:2]))
    print("| run | peak RSS (MB) | peak anonymous memory (MB) | anonymous above imports / X in memory | seconds |\n"
          "| --- | --- | --- | --- | --- |")
    print(f"| imports only | {floor['peak_mb']:,.0f} | {floor['anon_mb']:,.0f} | - | - |")
    for name, r, t in (("tokenize_cells (backed, chunks)", ours, t_ours), ("read_h5ad whole, then encode", whole, t_whole)):
        above = r["anon_mb"] - floor["anon_mb"]
        print(f"| {name} | {r['peak_mb']:,.0f} | {r['anon_mb']:,.0f} | {above * 2**20 / x_bytes:.2f} | {t:.0f} |")
    print(f"tokenize_cells / reading whole: peak RSS {ours['peak_mb'] / whole['peak_mb']:.2f} x, anonymous memory above "
          f"the imports {(ours['anon_mb'] - floor['anon_mb']) / max(whole['anon_mb'] - floor['anon_mb'], 1):.2f} x")

if __name__ == "__main__":
    main()
