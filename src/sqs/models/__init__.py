"""Models built from `sqs.nn.GLU`: one readable module per model."""
