"""One line per registered hashing method, for help text: readable without importing torch.

``tests/test_cli.py`` checks that these names are exactly the registered methods, so a method
added to ``hashindex.methods`` without a line here turns the suite red.
"""
from __future__ import annotations

# name: (supervision, what it is)
METHOD_SUMMARIES: dict[str, tuple[str, str]] = {
    "lsh": ("unsupervised", "random hyperplanes (Charikar 2002); baseline, trains in a second"),
    "itq": ("unsupervised", "PCA + iterative quantization rotation (Gong & Lazebnik 2011); baseline"),
    "uhga": ("unsupervised", "gradient attention hashing (Symmetry 2020); default profile 'frozen'"),
    "dpfah": ("supervised, needs labels", "parameter-free attention hashing, SimAM (Sci. Rep. 2022)"),
    "nrdh": ("unsupervised", "node-representation hashing, GCN auto-encoder (Pattern Recognition 2021)"),
    "lagnh": ("unsupervised + tags", "augmented graph network hashing (ACM MM 2021); --tags optional"),
    "ucsh": ("unsupervised", "clustering and separating similarities (ICASSP 2022)"),
}


def methods_help() -> str:
    width = max(map(len, METHOD_SUMMARIES))
    return "\n".join(f"  {name:<{width}}  {what} [{supervision}]"
                     for name, (supervision, what) in METHOD_SUMMARIES.items())
