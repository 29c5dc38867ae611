"""The training and eval readers over RecordIO shards: DALI, and the PyTorch fallback; never the writer."""
