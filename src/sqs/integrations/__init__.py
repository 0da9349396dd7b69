"""Optional bridges from SQS to other libraries' models.

Each submodule imports its library at import time and is never imported by the
core package (io, ops, functional, nn, models), so `sqs` works without them:

    sqs.integrations.transformers   Hugging Face models (`pip install 'sqs[hf]'`): the public API
    sqs.integrations.hf_mlps        finding every gated MLP of a model by its structure
    sqs.integrations.hf_fused       the fused forwards bound on those MLPs
    sqs.integrations.hf_loss        a causal LM's loss without the full logits
"""
