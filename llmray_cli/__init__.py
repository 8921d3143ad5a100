"""The `llmray` command line: the one place that composes the three programs.

The shared package `llmray` (API models, URIs, resolved configs) sits under the trainer
(`llmray_trainer`), the server (`llmray_serve`) and the operator (`llmray_operator`); this
package sits on top of all of them and nothing imports it (an import-linter contract in
pyproject.toml holds that). One module per command group, each adding its subcommands:

    resources.py   llmray validate / crds          (the API models only)
    local.py       llmray finetune / serve / init-model   (the trainer, the server)
    cluster.py     llmray operator                 (the operator)

Heavy imports (torch, ray, kopf) happen inside the commands that need them, so `validate`
and `crds` run with only the core package installed, and the operator image (no torch, no
ray) runs `llmray operator`.
"""
