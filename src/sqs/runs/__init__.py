"""Runs: one config, one run directory, one pipeline per domain, and the pool for many runs.

    sqs.runs.config_files     the TOML config system (shipped configs, `--set` overrides, gate parameters)
    sqs.runs.naming           the run-directory rule (`<root>/<config>/<dataset>/<gate>[-<tag>]-s<seed>`)
    sqs.runs.image_config     ImageRunConfig, with `run_dir(root)`
    sqs.runs.image_pipeline   image runs: task, train, load, and a grid of them through the pool
    sqs.runs.lm_config        LMRunConfig, with `run_dir(root)`
    sqs.runs.lm_pipeline      language-model runs: task, train (also under torchrun), load, generate
    sqs.runs.pool             skip finished runs, train the rest inline or in worker processes

The floor between the experiments (planning and reports) and the trainer, data, models below.
"""
