"""ADM's evaluation protocol in PyTorch (FID, sFID, Inception Score, precision/recall), plus a
small-data mode that measures the embedded datasets (digits, shapes) in the feature space of a small
classifier trained on them.

Entry points: `python -m evaluations.evaluator REF.npz SAMPLES.npz` and `evaluations.evaluator.evaluate`.
"""
