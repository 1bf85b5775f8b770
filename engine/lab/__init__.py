"""The lab: training, evaluation, ablation, metrics, checkpoint export and the demo.

Nothing here is needed to answer a request; the runtime (cli, service, protocol, backends)
never imports it, except the CLI delegating its sub-commands.
"""
