"""The training-checkpoint format: the one place that knows hibari_model.json, tensor key prefixes, the pickle-free
DCP storage (dcp_metadata.json + raw shards), step directories and `latest`.

    format.py   file names, hibari_model.json, train_state.json, step directories, `latest` (no torch import)
    storage.py  DCP StorageWriter/Reader on a JSON index and raw bytes; save_state / load_state; split_state
    tensors.py  one-process tensor reads (export) and model-only writes (conversion)
    model.py    a checkpoint's model as a plain one-process module (HF conversion, eval, vocabulary expansion)
    latest.py   verify a checkpoint; the newest undamaged step to resume from

`checkpoints/` (HF conversion) and the trainer use it. Names resolve lazily, so importing the package (as the
config module does) does not import torch.
"""

_MODULES = {
    "format": ("CONFIG_YAML", "DCP_METADATA_JSON", "EXTRA_STATE_DIR", "FORMAT_VERSION", "LATEST", "MODEL_JSON",
               "MODEL_PREFIX", "OPTIMIZER_PREFIX", "RNG_DIR", "STEP_PREFIX", "TMP_PREFIX", "TRAIN_STATE",
               "list_steps", "model_json_dict", "rank_file", "read_model_json", "read_train_state", "step_dir_name",
               "write_model_json"),
    "latest": ("find_latest", "find_resume_point", "verify_checkpoint"),
    "model": ("load_model", "load_model_state", "model_from_state"),
    "storage": ("async_save_state", "describe_failure", "load_state", "merge_extra", "save_state", "split_state"),
    "tensors": ("checkpoint_keys", "iter_model_tensors", "read_checked_index", "read_tensor", "save_model_state",
                "tensor_metadata"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"megatron_ext.checkpoint.{module}"), name)
