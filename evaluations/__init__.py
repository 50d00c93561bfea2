"""ADM's evaluation protocol in PyTorch (FID, sFID, Inception Score, precision/recall), plus a
small-data mode that measures the embedded datasets (digits, shapes, shapes-text) in the feature space of a
small classifier trained on them and shipped in assets/.

Entry points: `python -m evaluations.evaluator REF.npz SAMPLES.npz`, `evaluations.evaluator.evaluate`, and
`python -m evaluations.compare REF.npz A.npz B.npz`, paired differences of sets drawn from the same noise.
"""
