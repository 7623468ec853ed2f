"""What a sweep writes: the typed best.yaml record, the report, the multirun summary."""
