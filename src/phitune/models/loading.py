"""Load the base model and its tokenizer for training: Hub id or local folder, safetensors only.

Decisions made here (each logged once): the device, the dtype (``auto``: bfloat16 on a CUDA GPU that supports it,
else float32), the attention kernel (``auto``: flash_attention_2 when the package is installed and the GPU is Ampere
or newer, else sdpa), and the pad token (the Phi-3 cookbook's sample_finetune.py pads with ``<unk>``, not eos, so
that masking padding never masks the real end of a turn; right padding for training).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from ..config import ModelConfig, build_model_config
from ..errors import ConfigError
from ..lora.quantized import is_4bit_linear, keep_float_4bit_path, require_bitsandbytes

log = logging.getLogger("phitune")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(use_cpu: bool = False, device: str | None = None) -> torch.device:
    """The device to run on: ``device`` when given (``--device``: cpu, cuda, cuda:N, mps), else the current GPU when
    there is one and ``use_cpu`` is false, else cpu. The one place phitune picks a device."""
    if device:
        try:
            return torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"--device: {exc}; use cpu, cuda, cuda:N or mps") from None
    if not use_cpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_has_fast_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies bfloat16/float16 matrices in hardware (AVX512-BF16/FP16 or AMX).

    Without it (an AVX2 CPU), torch's half-precision matmuls fall back to a slow path: on the project's AVX2 machines
    a bfloat16 (512 x 9216) @ (9216 x 3072) product, the shape of a linear layer's input gradient, took 79 s against
    0.26 s in float32 (benchmarks/cpu_half_matmul.py). Unknown (an older torch without the probe): assumed fine.
    """
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return probe is None or bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


def resolve_dtype(name: str, device: torch.device, *, bf16_autocast: bool = False) -> torch.dtype:
    """The base weights' dtype for ``model.dtype``.

    ``auto`` is bfloat16 on a GPU that has it, and on a CPU with bfloat16 matrix hardware when bfloat16 autocast is
    on (``training_config.bf16``): autocast would otherwise re-cast every frozen float32 weight to bfloat16 at every
    matmul, forward and backward. The LoRA factors and their optimizer state stay float32 either way (add_lora's
    lora_dtype). Elsewhere float32.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and bf16_autocast and cpu_has_fast_half(torch.bfloat16):
            return torch.bfloat16
        return torch.float32
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.dtype: bfloat16 is not supported by this GPU (pre-Ampere); use float16 or float32")
    dtype = _DTYPES[name]
    if device.type == "cpu" and not cpu_has_fast_half(dtype):
        log.warning("model.dtype: %s on this CPU, which has no %s matrix hardware (AVX512-BF16/FP16 or AMX): its "
                    "matmuls run about 100x slower than float32 here. Set model.dtype: auto (float32 on a CPU) to "
                    "train or chat at CPU speed.", name, name)
    return dtype


def flash_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn 2 needs the package, an Ampere+ CUDA GPU, and half-precision weights."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if importlib.util.find_spec("flash_attn") is None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_attn_implementation(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The ``attn_implementation`` passed to transformers."""
    if name == "auto":
        return "flash_attention_2" if flash_attention_available(device, dtype) else "sdpa"
    if name == "flash_attention_2" and not flash_attention_available(device, dtype):
        raise ConfigError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package, an Ampere or newer CUDA GPU "
            f"and bfloat16/float16 weights (here: {device.type}, {str(dtype).replace('torch.', '')}); "
            "use auto or sdpa"
        )
    return name


def set_pad_token(tokenizer) -> None:
    """pad = unk when the tokenizer has one and pad is missing or equals eos; right padding for training."""
    if tokenizer.unk_token is not None and (tokenizer.pad_token is None
                                            or tokenizer.pad_token_id == tokenizer.eos_token_id):
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None:
        # No unk: eos is the only safe choice; labels come from the data pipeline, so no real eos is masked.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad or unk token: padding with eos (%s)", tokenizer.eos_token)
    tokenizer.padding_side = "right"


# The parts of tokenizer.json that decide the ids of a text and their text back. post_processor is left out: it only
# adds BOS/EOS around them, which tokenizer_config.json's add_bos_token governs and phitune's data pipeline sets itself.
_PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "decoder")
_MODEL_OPTIONS = ("unk_token", "byte_fallback", "fuse_unk", "dropout", "continuing_subword_prefix",
                  "end_of_word_suffix", "ignore_merges")


def open_tokenizer(source, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of ``source`` (a folder or Hub id) encoding exactly as its tokenizer.json defines, whatever class
    AutoTokenizer picks; logs the class used. Raises what transformers raises (OSError, ValueError).

    transformers 5 rebuilds a model-specific class's normalizer and pre-tokenizer from tokenizer_config.json instead
    of reading them from tokenizer.json. For Phi-3's files without a config.json beside them (a tokenizer-only
    folder, ``model.tokenizer: DIR``) that is a LlamaTokenizer rebuilt from ``legacy: false``, which drops the "▁"
    after every chat token (``<|user|>\nHello`` -> 10994 "Hello", not 15043 "▁Hello") and matches llama.cpp's 46
    reference texts 31 times, tokenizer.json as shipped 46 (issue 22; benchmarks/tokenizer_fidelity.py). And a legacy
    LlamaTokenizer saves no ``legacy`` flag, so a run folder it was saved to would reopen non-legacy. When the class's
    pipeline differs from the file's, the file wins: the folder is reopened as the generic TokenizersBackend, which
    applies it unchanged. A class from the model's own code (trust_remote_code) is kept: that code defines it."""
    from transformers import AutoTokenizer, TokenizersBackend

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    picked = type(tokenizer).__name__
    if not type(tokenizer).__module__.startswith("transformers."):
        log.info("tokenizer %s: %s (the model's own code)", source, picked)
        return tokenizer
    differs = _differs_from_tokenizer_json(tokenizer, source, revision)
    if not differs:
        log.info("tokenizer %s: %s", source, picked)
        return tokenizer
    tokenizer = TokenizersBackend.from_pretrained(source, **kwargs)
    log.info("tokenizer %s: TokenizersBackend, tokenizer.json as shipped (AutoTokenizer's %s rebuilds its %s "
             "differently)", source, picked, ", ".join(differs))
    return tokenizer


def _differs_from_tokenizer_json(tokenizer, source, revision) -> list[str]:
    """The parts in which ``tokenizer``'s backend differs from ``source``'s tokenizer.json (none when there is no
    tokenizer.json or no backend to compare): normalizer, pre-tokenizer, decoder, the model's kind and options, its
    vocabulary. Merges are not compared: every class reads them from the file."""
    import json

    from tokenizers import Tokenizer
    from transformers.utils import cached_file

    backend = getattr(tokenizer, "backend_tokenizer", None)
    path = cached_file(source, "tokenizer.json", revision=revision, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if backend is None or path is None:
        return []
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = data.get("model", {}).get("vocab")
    if data.get("model", {}).get("type") == "BPE":
        # Read back by `tokenizers` without its vocabulary, so both sides are serialized alike (serializing a 32k
        # vocabulary twice took seconds); Unigram refuses an empty vocabulary and is read whole.
        data = {**data, "model": {**data["model"], "vocab": {}, "merges": []}, "added_tokens": []}
    shipped = Tokenizer.from_str(json.dumps(data))

    def state(part):
        return None if part is None else json.loads(part.__getstate__())

    differs = [name for name in _PIPELINE_PARTS
               if state(getattr(backend, name)) != state(getattr(shipped, name))]
    ours, theirs = backend.model, shipped.model
    if type(ours) is not type(theirs) or any(getattr(ours, o, None) != getattr(theirs, o, None)
                                             for o in _MODEL_OPTIONS):
        differs.append("model")
    elif isinstance(vocab, dict) and backend.get_vocab(with_added_tokens=False) != vocab:
        differs.append("vocabulary")
    return differs


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of ``model_cfg`` (as its tokenizer.json defines, :func:`open_tokenizer`) with the pad token set
    for training."""
    source = model_cfg.tokenizer or model_cfg.name_or_path
    try:
        tokenizer = open_tokenizer(source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.{'tokenizer' if model_cfg.tokenizer else 'name_or_path'}: cannot load a tokenizer "
                          f"from '{source}': {exc}") from exc
    if model_cfg.model_max_length is not None:
        tokenizer.model_max_length = model_cfg.model_max_length
    set_pad_token(tokenizer)
    return tokenizer


def load_model_and_tokenizer(model_cfg: ModelConfig, *, device: torch.device | str | None = None,
                             host_load: bool = False, tokenizer=None, bf16_autocast: bool = False,
                             weights: bool = True):
    """(model, tokenizer) for training: safetensors weights, use_cache off, dtype and attention resolved;
    ``tokenizer``: one already loaded by load_tokenizer (else it is loaded here); ``bf16_autocast``: training runs
    under bfloat16 autocast (``resolve_dtype``: a frozen base is then held in bfloat16 where the CPU has the hardware).

    ``host_load``: dtype and attention are chosen for ``device`` but the weights stay in host memory (FSDP then
    shards them onto the device: a base that does not fit one GPU is never placed whole on one).
    ``weights=False``: the model without its weights (:func:`empty_model`: parameters on the meta device), for a
    process that receives its shards from the one that reads the files (phitune.training.distributed).

    Under plain data parallelism every process calls this with ``weights=True``, chosen over rank 0 loading and
    broadcasting: transformers maps the safetensors file, and on a CPU the model's tensors stay views of the
    mapping when the stored dtype is the one loaded, so the processes of a node share one copy of its pages (2
    processes, a 428 MB float32 model: 450 MB of PSS on the node against 437 MB for one process,
    benchmarks/loading_memory.py); on a GPU each streams its copy to its own device (``device_map``). A broadcast
    must land in memory each receiving process owns, a private copy per process: the node peak is never lower.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(model_cfg, (str, dict)):

        model_cfg = build_model_config(model_cfg)
    device = torch.device(device) if device is not None else resolve_device()
    dtype = resolve_dtype(model_cfg.dtype, device, bf16_autocast=bf16_autocast)
    attn = resolve_attn_implementation(model_cfg.attn_implementation, device, dtype)
    qlora_kwargs = load_kwargs(model_cfg, device, dtype)  # {} unless model.load_in_4bit; refuses bad combos
    if model_cfg.trust_remote_code:
        log.warning("model.trust_remote_code is true: the Python code in '%s' will run on this machine. "
                    "Phi-3 needs none in transformers 5.", model_cfg.name_or_path)
    log.info("model %s: %s, %s, attention %s", model_cfg.name_or_path, device,
             str(dtype).replace("torch.", ""), attn)

    if tokenizer is None:
        tokenizer = load_tokenizer(model_cfg)
    kwargs = dict(revision=model_cfg.revision, dtype=dtype, attn_implementation=attn, use_safetensors=True,
                  trust_remote_code=model_cfg.trust_remote_code)
    kwargs.update(qlora_kwargs)
    if device.type == "cuda" and not host_load:
        kwargs["device_map"] = {"": str(device)}  # load straight onto the GPU, no full copy in host memory
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
        else:
            model = empty_model(model_cfg, dtype, attn)
    except (OSError, ValueError) as exc:
        hint = ""
        if "safetensors" in str(exc).lower():
            hint = (" phitune loads weights only from .safetensors files (a pickled .bin can run code); convert the "
                    "checkpoint with `model.save_pretrained(dir, safe_serialization=True)`.")
        raise ConfigError(f"model.name_or_path: cannot load '{model_cfg.name_or_path}': {exc}.{hint}") from exc
    if device.type != "cuda" and weights:
        model.to(device)
    model.config.use_cache = False
    if qlora_kwargs:
        prepare_kbit_training(model)

    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                          f"{rows} rows; use the model's own tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def empty_model(model_cfg: ModelConfig, dtype: torch.dtype, attn: str):
    """The model of ``model_cfg`` built from its config alone: every parameter on the meta device (no memory, no
    file read), buffers real, so the tables a model computes in ``__init__`` (RoPE's inv_freq, which no checkpoint
    holds) need no loading. Its parameters are filled later from the checkpoint (:func:`checkpoint_files`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)

    def on_meta(module, name, param):
        # torch.empty of a large weight maps pages it never touches, so the transient host copy costs no memory
        if param is not None and param.device.type != "meta":
            return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    # A documented torch hook, registered only while this model is built (torch.device("meta") would put the
    # buffers on meta as well, and recomputing them needs each model class's own code).
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(on_meta)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    finally:
        handle.remove()
    return model


def checkpoint_files(model_cfg: ModelConfig) -> list[Path]:
    """The .safetensors files of ``model_cfg``'s weights: a local folder's, or the Hub's (downloaded to its cache on
    first use), in the order of the shard index when there is one."""
    source = Path(model_cfg.name_or_path)

    def fetch(name: str) -> Path | None:
        if source.is_dir():
            return source / name if (source / name).is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(model_cfg.name_or_path, name, revision=model_cfg.revision))
        except EntryNotFoundError:
            return None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [fetch(name) for name in shards]
    single = fetch("model.safetensors")
    if single is None:
        raise ConfigError(f"model.name_or_path: '{model_cfg.name_or_path}' has no model.safetensors(.index.json); "
                          "phitune loads weights only from .safetensors files (convert with "
                          "`model.save_pretrained(dir, safe_serialization=True)`)")
    return [single]


def enable_checkpointing(model, kwargs: dict | None = None) -> None:
    """Gradient (activation) checkpointing, non-reentrant unless ``kwargs`` say otherwise, so LoRA weights inside
    frozen blocks still get gradients; with reentrant checkpointing the embedding output is made to require grad
    (reentrant checkpointing only backpropagates into a block whose inputs require grad)."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if kwargs["use_reentrant"]:
        model.enable_input_require_grads()
    model.config.use_cache = False


# --- 4-bit (QLoRA) loading and k-bit training preparation -------------------------------------------------------


def compute_dtype(model_cfg, model_dtype):
    """The torch dtype of the 4-bit matmuls."""
    name = model_cfg.quantization.compute_dtype
    return model_dtype if name == "auto" else getattr(torch, name)


def check_4bit_supported(model_cfg, device, model_dtype) -> None:
    """Refuse, before anything is loaded, the 4-bit combinations that cannot work."""
    require_bitsandbytes()
    if device.type not in ("cuda", "cpu", "xpu"):
        raise ConfigError(f"model.load_in_4bit: bitsandbytes 4-bit layers run on CUDA, XPU or the CPU, not on "
                          f"{device.type}; set training_config.use_cpu: true or model.load_in_4bit: false")
    cdt = compute_dtype(model_cfg, model_dtype)
    if cdt == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("model.quantization.compute_dtype: bfloat16 is not supported by this GPU (pre-Ampere); "
                          "use float16")


def bnb_config(model_cfg, model_dtype):
    """transformers' BitsAndBytesConfig for ``model_cfg`` (``model.load_in_4bit`` must be true)."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    q = model_cfg.quantization
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(model_cfg, model_dtype))


def load_kwargs(model_cfg, device, model_dtype) -> dict:
    """Extra ``from_pretrained`` keyword arguments for a 4-bit base (empty when ``load_in_4bit`` is false)."""
    if not getattr(model_cfg, "load_in_4bit", False):
        return {}
    check_4bit_supported(model_cfg, device, model_dtype)
    log.info("model: 4-bit %s base (double quant %s, compute %s)", model_cfg.quantization.type,
             model_cfg.quantization.double_quant, str(compute_dtype(model_cfg, model_dtype)).replace("torch.", ""))
    return {"quantization_config": bnb_config(model_cfg, model_dtype)}


def prepare_kbit_training(model, *, gradient_checkpointing: bool = False,
                          gradient_checkpointing_kwargs: dict | None = None):
    """Make a 4-bit base ready for LoRA training; returns the model.

    - every base parameter is frozen (the 4-bit weights cannot train; LoRA adds its own trainable factors);
    - float16 parameters that stay unquantized (norms, embeddings, lm_head) are upcast to float32: fp16 overflows in
      RMSNorm and the loss. bfloat16 ones are kept: bf16 has fp32's range, and upcasting them would turn the whole
      residual stream into float32 (twice the activation memory) for no measured gain;
    - with gradient checkpointing (non-reentrant by default, as in train.py): reentrant checkpointing only
      backpropagates into a block whose input requires grad, and with every base weight frozen nothing does, so
      the embedding output is made to require grad;
    - use_cache off (a cache is useless in training and conflicts with checkpointing);
    - bitsandbytes' bfloat16 CPU inference kernel is kept off (:func:`keep_float_4bit_path`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    keep_float_4bit_path(model)
    for module in model.modules():
        if is_4bit_linear(module):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dtype == torch.float16:
                p.data = p.data.float()
    if gradient_checkpointing:
        enable_checkpointing(model, gradient_checkpointing_kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model
