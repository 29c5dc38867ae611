"""The shard writer: manifests, img2dataset tars and caption sidecars in, RecordIO shards out (tools/data2rec.py)."""
