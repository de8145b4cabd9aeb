"""servegrid: disaggregated LLM serving on a cluster of GPU nodes."""

__version__ = "0.1.0"
