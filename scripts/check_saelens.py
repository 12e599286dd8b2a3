"""Check that SAELens' own ``ActivationsStore`` reads a ``workbench export --format saelens`` folder.

SAELens pins transformer-lens below 4, so it cannot live in the project's environment. This
script makes its own venv (``artifacts/runs/saelens-venv``, git-ignored) with ``sae-lens``, then:

1. with the project's venv: a small organism run, exported twice, as ``--format saelens`` and as an
   HDF5 cache of the same hook (the reference);
2. in the SAELens venv: ``ActivationsStore(cached_activations_path=...)`` loads the folder (its own
   schema checks: the hook's ``Array2D(context_size, d_in)`` column, ``token_ids``), and the
   activations and token ids of its buffer (unshuffled) must equal the HDF5 cache's, window by window.

    python scripts/check_saelens.py            # prints the SAELens version and PASS / FAIL
    python scripts/check_saelens.py --export artifacts/runs/acts --hook blocks.2.hook_resid_post --context-size 128
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_BIN = ROOT / ".venv" / "bin"
VENV = ROOT / "artifacts" / "runs" / "saelens-venv"
TORCH = "torch==2.13.0"  # as the Makefile: the local CPU build here; a bare torch would pull a CUDA build

SAELENS_SIDE = r'''
import sys, json
import numpy as np, torch, datasets
import sae_lens
from sae_lens.training.activations_store import ActivationsStore

folder, hook, context_size, d_in, ref_acts, ref_ids = sys.argv[1:7]
context_size, d_in = int(context_size), int(d_in)
n_windows = len(datasets.load_from_disk(folder))
store = ActivationsStore(
    model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
    context_size=context_size, d_in=d_in, n_batches_in_buffer=2, total_training_tokens=n_windows * context_size,
    store_batch_size_prompts=n_windows, train_batch_size_tokens=context_size, prepend_bos=False,
    normalize_activations="none", device=torch.device("cpu"), dtype="float32", cached_activations_path=folder,
)
acts, ids = store.get_raw_llm_batch()  # every window, in order
acts = acts.reshape(-1, d_in).numpy()
want, want_ids = np.load(ref_acts), np.load(ref_ids)
n = acts.shape[0]
ok = n == n_windows * context_size and np.array_equal(acts, want[:n]) and np.array_equal(ids.numpy(), want_ids[:n])
store.current_row_idx = 0
batch = store.next_batch()  # the training path: SAELens' mixing buffer and data loader
rows = {r.tobytes() for r in want[:n]}
trained_ok = tuple(batch.shape) == (context_size, d_in) and all(r.tobytes() in rows for r in batch.numpy())
ok = ok and trained_ok
print(json.dumps({"sae_lens": sae_lens.__version__, "windows": n_windows, "tokens_read": int(n), "d_in": d_in,
                  "equal_to_hdf5_cache": bool(ok),
                  "next_batch_rows_from_the_export": bool(trained_ok)}))
sys.exit(0 if ok else 1)
'''


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="blocks.2.hook_resid_post")
    p.add_argument("--context-size", type=int, default=32)
    p.add_argument("--samples", type=int, default=16)
    a = p.parse_args()
    if not (VENV / ".installed").exists():
        sh(sys.executable, "-m", "venv", str(VENV))
        sh(str(VENV / "bin" / "pip"), "install", "--quiet", TORCH)
        sh(str(VENV / "bin" / "pip"), "install", "--quiet", "sae-lens", "datasets")
        (VENV / ".installed").touch()
    with tempfile.TemporaryDirectory(dir=ROOT / "artifacts" / "runs") as tmp:
        tmp = Path(tmp)
        run, folder, cache = tmp / "run.h5", tmp / "acts", tmp / "cache.h5"
        wb = str(PROJECT_BIN / "workbench")
        sh(wb, "run", "--limit", str(a.samples), "--rounds", "3", "--out", str(run), "--device", "cpu")
        sh(wb, "export", str(run), "--hooks", a.hook, "--format", "saelens", "--context-size", str(a.context_size),
           "--out", str(folder), "--device", "cpu")
        sh(wb, "export", str(run), "--hooks", a.hook, "--out", str(cache), "--device", "cpu")
        reference = (
            "import h5py, numpy as np, sys; f = h5py.File(sys.argv[1]); "
            f"np.save(sys.argv[2], f['activations/{a.hook}'][...].reshape(f.attrs['n_tokens'], -1)); "
            "np.save(sys.argv[3], f['tokens/token_id'][...].astype(np.int64)); print(f['activations/" + a.hook + "'].shape[1:])"
        )
        shape = subprocess.run([str(PROJECT_BIN / "python"), "-c", reference, str(cache), str(tmp / "acts.npy"), str(tmp / "ids.npy")],
                               check=True, capture_output=True, text=True).stdout
        d_in = 1
        for x in shape.strip().strip("(),").split(","):
            d_in *= int(x) if x.strip() else 1
        done = subprocess.run([str(VENV / "bin" / "python"), "-c", SAELENS_SIDE, str(folder), a.hook, str(a.context_size), str(d_in),
                               str(tmp / "acts.npy"), str(tmp / "ids.npy")])
        print("PASS" if done.returncode == 0 else "FAIL")
        sys.exit(done.returncode)


if __name__ == "__main__":
    main()
