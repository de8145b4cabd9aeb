"""The hello-world graphs: ``agg`` (decode workers prefill themselves) and ``disagg``."""
