"""loc3r-eval: the paper's metrics on a labelled dataset (dataset, metrics, the Ray runner)."""
