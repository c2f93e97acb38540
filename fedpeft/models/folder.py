"""A local Hugging Face model folder as a base model (``model.name = "/path/to/folder"``).

Any checkpoint that ``AutoModelForSequenceClassification`` or
``AutoModelForCausalLM`` loads, with its tokenizer saved beside it, becomes a
:class:`~fedpeft.models.registry.ModelSpec` like the bundled models, so the
resident model, the client and the server take it through the same path.

Everything that can be checked without loading the weights (``config.json``,
the task, LoRA's default target modules, readable weight files) is checked
when the spec is built, i.e. during config validation, before a run folder
is written.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fedpeft.errors import AssetError, ConfigError
from fedpeft.models.spec import ModelSpec, Task, freeze
from fedpeft.models.pooling import MEAN_POOLING_ARCHITECTURES, use_mean_pooling

TASKS = ("classification", "causal_lm")

# Names transformers gives a sequence-classification head; peft's own
# PeftModelForSequenceClassification looks for the same two.
HEAD_NAMES = ("classifier", "score")

# Files one of which every saved tokenizer has (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")

# Config attributes that hold a dropout probability, across architectures;
# ``model.dropout`` sets whichever of them a checkpoint's config has.
DROPOUT_ATTRIBUTES = (
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout",
    "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "seq_classif_dropout",
)


def is_model_folder(name: str) -> bool:
    """Whether ``model.name`` names a local folder rather than a bundled model."""
    return Path(name).expanduser().is_dir()


@functools.lru_cache(maxsize=32)
def folder_model_spec(name: str, task: str = "auto") -> ModelSpec:
    """The spec of the model folder ``name`` for ``task`` ("auto" = inferred from its config).

    Raises
    ------
    ConfigError
        When the folder has no readable ``config.json`` or weights, the task
        cannot be inferred or does not fit the architecture.
    """
    path = Path(name).expanduser()
    config = _read_config(name, path)
    task = _resolve_task(name, config, task)
    checkpoint_keys = _checkpoint_keys(name, path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty-vocabulary tokenizer from config.json
        # alone, and every text would train as unknown tokens.
        raise ConfigError(
            f"model.name = {name!r}: the folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            "save the tokenizer into it with tokenizer.save_pretrained"
        )
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    # Empty when peft has no mapping for the architecture: config validation
    # then asks for peft.target_modules (it knows whether they were given).
    targets = tuple(PEFT_TARGETS.get(config.model_type, ()))
    head = _head_modules(config, task, checkpoint_keys)
    return ModelSpec(
        name=name,
        task=task,
        default_targets=targets,
        head_modules=head,
        load=functools.partial(load_model_folder, path, task),
        poolings=("mean",) if task == "classification" and config.model_type in MEAN_POOLING_ARCHITECTURES else (),
        description=f"local {config.model_type} folder {path} ({task})",
        architecture=config.model_type,
    )


def _read_config(name: str, path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name = {name!r}: the folder has no config.json; a Hugging Face model folder holds config.json, "
            "the weights and the tokenizer files (save_pretrained writes them)"
        )
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model.name = {name!r}: transformers cannot read its config.json ({reason})") from None


def _resolve_task(name: str, config, task: str) -> Task:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    supported = {"classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                 "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    if task in ("", "auto"):
        architectures = list(getattr(config, "architectures", None) or [])
        if any(a.endswith("ForCausalLM") for a in architectures):
            task = "causal_lm"
        elif any(a.endswith("ForSequenceClassification") for a in architectures):
            task = "classification"
        elif config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
            # An encoder (BERT, RoBERTa, ...) saved without a head: fedpeft
            # fine-tunes encoders as classifiers.
            task = "classification"
        else:
            raise ConfigError(
                f"model.task: cannot tell from {name}/config.json (model_type {config.model_type!r}, architectures "
                f"{architectures}) whether it is a classifier or a causal LM; set model.task = 'classification' or "
                "'causal_lm'"
            )
    if task not in TASKS:
        raise ConfigError(f"model.task = {task!r} is not valid; choose one of: auto, {', '.join(TASKS)}")
    if config.model_type not in supported[task]:
        able = [t for t in TASKS if config.model_type in supported[t]]
        raise ConfigError(
            f"model.task = {task!r}: transformers has no {task} model for {config.model_type!r} ({name}); "
            f"valid for it: {', '.join(able) or 'none'}"
        )
    return task  # type: ignore[return-value]


def _checkpoint_keys(name: str, path: Path) -> set[str] | None:
    """The tensor names in the folder's weights (None for pickled ``.bin`` weights, whose names need a full load).

    Reading each safetensors header also catches a truncated or foreign file here.
    """
    from safetensors import SafetensorError, safe_open

    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors and not sorted(path.glob("pytorch_model*.bin")):
        raise ConfigError(
            f"model.name = {name!r}: the folder has no weights (model.safetensors or pytorch_model.bin); "
            "save the model with save_pretrained"
        )
    if not safetensors:
        return None
    keys: set[str] = set()
    for file in safetensors:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys.update(handle.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"model.name = {name!r}: cannot read the weights in {file.name} ({exc})") from None
    return keys


def _head_modules(config, task: str, checkpoint_keys: set[str] | None) -> tuple[str, ...]:
    """The modules trained in full and sent with the adapter, found on a weightless (meta-device) model.

    A classifier's ``classifier``/``score``, plus every module whose weights
    the checkpoint lacks (e.g. BERT's pooler in a masked-LM checkpoint):
    transformers initialises those at random, so unless they travel with the
    adapter, ``PeftModel.from_pretrained`` on the same folder would not
    rebuild the model fedpeft trained.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    children = dict(model.named_children())
    head = [n for n in HEAD_NAMES if n in children] if task == "classification" else []
    if checkpoint_keys is not None:
        # A checkpoint of the bare encoder names its tensors without the base
        # model's prefix ("encoder..." for "bert.encoder..."); transformers maps both.
        prefix = model.base_model_prefix
        present = checkpoint_keys | {f"{prefix}.{k}" for k in checkpoint_keys}
        missing = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if n not in present}
        head += sorted(m for m in missing if not any(m == h or m.startswith(h + ".") for h in head))
    return tuple(head)


def _dropout_overrides(config, dropout: float) -> dict[str, float]:
    return {attr: float(dropout) for attr in DROPOUT_ATTRIBUTES
            if isinstance(getattr(config, attr, None), (int, float)) and not isinstance(getattr(config, attr), bool)}


def load_model_folder(path: Path, task: str, num_labels: int, dropout: float, pooling: str = "cls"):
    """The folder's model (frozen, eval mode) and tokenizer, for ``task``.

    A classifier gets a head for ``num_labels`` labels: freshly initialised
    when the checkpoint has none or one of another size. ``pooling = "mean"``
    (BERT-family classifiers) feeds it the masked mean of the last hidden states.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise AssetError(
            f"model.name = {str(path)!r}: cannot load its tokenizer ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            "save it into the folder with tokenizer.save_pretrained"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AssetError(f"model.name = {str(path)!r}: its tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    overrides = _dropout_overrides(AutoConfig.from_pretrained(path), dropout)
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, **overrides
            )
            # Decoder classifiers (LlamaForSequenceClassification, ...) pool the
            # last non-pad token and need to know which token pads.
            model.config.pad_token_id = tokenizer.pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **overrides)
    except (OSError, ValueError, RuntimeError) as exc:
        raise AssetError(f"model.name = {str(path)!r}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if pooling == "mean":
        use_mean_pooling(model)
    return freeze(model.float()), tokenizer
