"""Data: the record format, the shard writer, the training readers. Each part depends one way only
(tests/test_import_rules.py keeps it so):

    format/   the record format both sides share: MXNet RecordIO (recordio), the record layout and
              meta JSON (schema), data positions (position), what an image in a record is (images)
    ingest/   the shard writer behind tools/data2rec.py: inputs (sources, typed_columns), the index
              in columns (sample_index), the plan (shard_plan), the run (convert). Uses the format.
    loaders/  the readers the trainer uses: DALI (dali), the PyTorch fallback (torch_loader), their
              shared contract, settings and preflight (config). Use the format, never the writer.
"""
