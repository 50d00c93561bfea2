"""ADM's evaluation protocol in PyTorch (FID, sFID, Inception Score, precision/recall), plus a
small-data mode that measures the embedded digits in the feature space of a digits classifier.

Entry points: `python -m evaluations.evaluator REF.npz SAMPLES.npz` and `evaluations.evaluator.evaluate`.
"""
