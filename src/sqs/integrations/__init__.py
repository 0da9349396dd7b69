"""Optional bridges from SQS to other libraries' models.

Each submodule imports its library at import time and is never imported by the
core package (io, ops, functional, nn, models), so `sqs` works without them:

    sqs.integrations.transformers   Hugging Face gated MLPs (`pip install 'sqs[hf]'`)
"""
