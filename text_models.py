"""The text tower's checkpoint, found and read before the model is built (HTCL Sec. 2.1, E_text:
"a pretrained BERT"; any transformers checkpoint here): which folder to load, offline first
(resolve_text_model), and, for text_pooling = "auto", which pooling it was trained for
(auto_text_pooling). model.py's TextEncoder calls both; nothing here builds a model. E.g.

    python pretrain.py --preset presets/small.toml --model.text_model PATH   # prints "text_pooling auto -> ..."
"""
import json
import os

# sentence-transformers' Pooling config (1_Pooling/config.json) -> this tower's pooling
ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


def _st_file(name_or_path, filename):
    """A file of a local folder, or of a hub checkpoint already in the Hugging Face cache; else None."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(name_or_path, filename)
    except Exception:  # not a repo id, or no huggingface_hub: no such file known here
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def sentence_transformers_pooling(name_or_path):
    """The pooling a sentence-transformers checkpoint was trained with -> (mode, config file), from
    its modules.json (the Pooling module's folder) and that folder's config.json; (None, None) for a
    checkpoint that is not one. mode: the config's pooling_mode_* key that is true."""
    modules_path = _st_file(name_or_path, "modules.json")
    if modules_path is None:
        return None, None
    with open(modules_path) as f:
        modules = json.load(f)
    folders = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("models.Pooling")]
    if not folders:
        return None, None
    config_path = _st_file(name_or_path, os.path.join(folders[0], "config.json"))
    if config_path is None:
        return None, None
    with open(config_path) as f:
        config = json.load(f)
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    return (modes[0] if modes else None), config_path


def auto_text_pooling(name_or_path, has_pooler):
    """text_pooling = "auto" -> (pooling, why): a sentence-transformers checkpoint's own pooling
    (its sentence vectors were trained through it; its BERT pooler, if any, was not), else the
    pooler_output when the model has a pooler (the paper's BERT), else the [CLS] token."""
    mode, config_path = sentence_transformers_pooling(name_or_path)
    if config_path is not None:
        if mode in ST_POOLING:
            return ST_POOLING[mode], f"{name_or_path} is a sentence-transformers checkpoint trained with " \
                                     f"{mode} ({config_path})"
        return "mean", f"{name_or_path} is a sentence-transformers checkpoint with {mode} ({config_path}), " \
                       f"which this tower does not implement: mean, the nearest (or set --model.text_pooling)"
    if has_pooler:
        return "pooler", "the model has a pooler (the paper's BERT pooler_output); no sentence-transformers config"
    return "cls", "the model has no pooler and no sentence-transformers config: the [CLS] token"


def resolve_text_model(name, timeout=4.0):
    """A text model to load, or one ValueError that says what was looked for and how to fix it.

    Order: a local folder (returned as is); the Hugging Face cache (its snapshot folder, so that
    nothing later touches the network); else the hub, asked once with a short timeout. A machine
    without internet otherwise sits through transformers' retries for ~50 s, then a long traceback.
    """
    if os.path.isdir(name):
        return name
    from huggingface_hub import constants, model_info, snapshot_download
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached (or not a valid repo id): go on to the hub
        pass
    fix = (f"Fix: set --model.text_model (text_model in a preset's [pretrain.model]) to a local folder "
           f"with config.json, weights and tokenizer, e.g. made on a connected machine by "
           f"`hf download {name} --local-dir DIR` (huggingface_hub's CLI) and copied here; or fill the cache there and "
           f"copy {constants.HF_HUB_CACHE}, then run with HF_HUB_OFFLINE=1.")
    looked = f"text model {name!r}: no folder {os.path.abspath(name)}, not in the Hugging Face cache " \
             f"{constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{looked}, and HF_HUB_OFFLINE is set. {fix}")
    # One request in a daemon thread: a host that hangs (or a DNS lookup that does) cannot hold us.
    import threading
    result = {}

    def ask():
        try:
            model_info(name, timeout=timeout)
            result["ok"] = True
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    if result.get("ok"):
        return name  # reachable: transformers downloads it into the cache
    reason = result.get("error", f"no answer in {timeout:.0f} s")
    raise ValueError(f"{looked}, and the hub did not provide it ({reason}). {fix}")
