"""Run configuration for every verb: typed dataclasses, one per section, loaded from YAML recipes (which
may name a ``base:`` recipe and hold only what differs) and dotted ``section.key=value`` overrides.

    name: demo
    model:  {name: mixmim_tiny, img_size: 224}
    method: {name: mixmim, mask_ratio: 0.5}     # pretraining: the fields of that method's options
    data:   {source: bundled}
    optim:  {base_lr: 1.5e-4}
    train:  {epochs: 10, batch_size: 32}

The sections ``model``, ``data``, ``optim`` and ``train`` are shared by every verb (pretrain, finetune,
linprobe, knn, segment); each verb adds its own (``method``; ``finetune`` and ``eval``; ``probe``;
``knn``; ``segment``) and its own defaults (:data:`VERB_DEFAULTS`). Every key is checked before any
work starts: an unknown key or a value of the wrong type stops the run with one line naming the key,
the value and what is expected. Nothing here imports torch.

- :mod:`~mixmim.config.sections`: the sections (``data``: :mod:`mixmim.data.config`; ``method``:
  :mod:`mixmim.methods.options`);
- :mod:`~mixmim.config.runs`: one root per verb, the verbs' defaults, the demo preset;
- :mod:`~mixmim.config.recipes`: recipe files, ``base:`` chains, loading;
- :mod:`~mixmim.config.validation`: the checks before any work.
"""

from mixmim.config.recipes import (
    RECIPES,
    TRANSFER_RECIPES,
    dump_config,
    list_recipes,
    load_config,
    load_run_config,
    merge_trees,
    read_recipe,
    recipe_path,
    recipe_verb,
    resolve_tree,
)
from mixmim.config.runs import (
    DEMO,
    VERB_CONFIGS,
    VERB_DEFAULTS,
    DetectRunConfig,
    FinetuneRunConfig,
    KNNRunConfig,
    ProbeRunConfig,
    RunConfig,
    SegmentRunConfig,
)
from mixmim.config.sections import (
    DetectConfig,
    EvalConfig,
    FinetuneConfig,
    KNNConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ProbeConfig,
    SegmentConfig,
    TrainConfig,
    TransferModelConfig,
)
from mixmim.config.validation import check_steps, validate
from mixmim.data.config import DataConfig
from mixmim.utils.typed import ConfigError, build_dataclass, read_yaml

__all__ = ["DEMO", "RECIPES", "TRANSFER_RECIPES", "VERB_CONFIGS", "VERB_DEFAULTS", "ConfigError", "DataConfig",
           "DetectConfig", "DetectRunConfig",
           "EvalConfig", "FinetuneConfig", "FinetuneRunConfig", "KNNConfig", "KNNRunConfig", "ModelConfig",
           "MonitorConfig", "OptimConfig", "ProbeConfig", "ProbeRunConfig", "RunConfig", "SegmentConfig",
           "SegmentRunConfig", "TrainConfig", "TransferModelConfig", "build_dataclass", "check_steps", "dump_config",
           "list_recipes", "load_config", "load_run_config", "merge_trees", "read_recipe", "read_yaml", "recipe_path",
           "recipe_verb", "resolve_tree", "validate"]
