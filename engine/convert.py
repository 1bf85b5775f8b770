"""``python -m engine convert``: LLaVA-family checkpoints -> a safetensors folder the engine loads.

    python -m engine convert --from GeoChat-7B --to GeoChat-7B-engine --vision-tower clip-vit-large-patch14-336

This is the ONE place in the engine where pickle weight files (``.bin``, ``.pt`` ...) are read, and
only with ``torch.load(path, map_location="cpu", weights_only=True)``: the restricted unpickler
builds tensors and plain containers and refuses anything else (classes, functions), and what it
returns is checked again to be tensors in plain containers.  A file that holds anything else is
refused with ``EngineError(BAD_CHECKPOINT)`` naming it.  Everything the engine loads afterwards is
safetensors.

Inputs
  * the original LLaVA / GeoChat layout (config with ``mm_vision_tower``; see
    :mod:`engine.backends.original_llava`), with ``--vision-tower`` pointing at a local copy of its
    CLIP tower (unless ``mm_vision_tower`` is itself a local folder), and ``--image-size``
    defaulting to 504 for GeoChat, else the tower's own size;
  * a transformers LLaVA folder (``model_type: "llava"``) whose weights are pickles.

Output: ``config.json`` (``model_type: "llava"``, plus ``image_size`` and an ``rs_lvlm`` section
saying where it came from), safetensors shards (one per input shard, plus one for the vision tower)
with ``model.safetensors.index.json`` when there are several, the tokenizer (``tokenizer.json``, with
``<image>`` added for original checkpoints), ``preprocessor_config.json`` and the generation config.
Input shards are converted one at a time, so memory holds one shard, not the whole model.  The
folder is written next to the target under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import shutil
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .backends import PICKLE_SUFFIXES, is_original_llava, read_config
from .backends.memory import shard_index
from .backends.tokenizer_files import IMAGE_TOKEN, load_tokenizer
from .errors import BAD_CHECKPOINT, BAD_REQUEST, EngineError

log = logging.getLogger("engine.convert")

__all__ = ["read_weights", "convert", "main"]

DTYPES = {"keep": None, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state")
EXTRA_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")
DEFAULT_PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": True,
                        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                        "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "do_convert_rgb": True}


# -- reading weights ---------------------------------------------------------------------------
def _check_plain(obj: Any, path: Path, depth: int = 0) -> None:
    """Tensors, numbers, strings and dict/list/tuple containers only."""
    if depth > 8:
        raise EngineError(BAD_CHECKPOINT, f"refused {path.name}: nesting too deep for a weights file")
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise EngineError(BAD_CHECKPOINT,
                                  f"refused {path.name}: a key of type {type(k).__name__} in its pickle")
            _check_plain(v, path, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, path, depth + 1)
        return
    raise EngineError(BAD_CHECKPOINT, f"refused {path.name}: its pickle holds a {type(obj).__name__}, "
                                      "not only tensors in plain containers")


def _tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping (unwrapping a lone ``state_dict`` / ``model`` / ``module``)."""
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "module"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping):
        raise EngineError(BAD_CHECKPOINT,
                          f"refused {path.name}: it holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise EngineError(BAD_CHECKPOINT,
                          f"refused {path.name}: entries {', '.join(map(str, bad[:5]))} are not tensors")
    return {str(k): v for k, v in obj.items()}


def read_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of one weights file: safetensors, or a pickle through ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise EngineError(BAD_CHECKPOINT, f"{path} is not a readable safetensors file: {exc}") from None
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise EngineError(BAD_CHECKPOINT, f"{path.name}: unknown weights format")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(BAD_CHECKPOINT, (
            f"refused {path}: its pickle holds something other than tensors and plain containers, and is "
            f"not loaded because that could run code ({first})")) from None
    except Exception as exc:
        raise EngineError(BAD_CHECKPOINT, f"{path} is not a readable PyTorch weights file: {exc}") from None
    _check_plain(payload, path)
    return _tensor_dict(payload, path)


def weight_files(folder: Path) -> list[Path]:
    """A folder's weight shards: from its index, else its safetensors, else its pickles."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            return shard_index(index, folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
                       and not p.name.startswith(NOT_WEIGHTS))
    if not files:
        raise EngineError(BAD_CHECKPOINT, f"{folder} holds no weight files (.safetensors or .bin)")
    return files


# -- writing -----------------------------------------------------------------------------------
class ShardWriter:
    """Writes safetensors shards into a temporary folder and renames them when all are known."""

    def __init__(self, folder: Path, dtype: torch.dtype | None) -> None:
        self.folder = folder
        self.dtype = dtype
        self.parts: list[tuple[Path, list[str]]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.total_bytes = 0
        self.parameters = 0

    def write(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        out = {}
        for name, t in tensors.items():
            if name in self.shapes:
                raise EngineError(BAD_CHECKPOINT, f"parameter {name!r} appears twice (again in {source})")
            if self.dtype is not None and t.is_floating_point():
                t = t.to(self.dtype)
            out[name] = t.detach().contiguous().clone() if not t.is_contiguous() else t.detach()
            self.shapes[name] = tuple(t.shape)
            self.total_bytes += t.numel() * t.element_size()
            self.parameters += t.numel() if t.is_floating_point() else 0
        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        try:
            save_file(out, str(path), metadata={"format": "pt"})
        except (RuntimeError, ValueError):  # tensors sharing storage (tied or sliced views): store copies
            save_file({k: v.clone() for k, v in out.items()}, str(path), metadata={"format": "pt"})
        self.parts.append((path, sorted(out)))

    def finish(self) -> list[str]:
        n = len(self.parts)
        if n == 0:
            raise EngineError(BAD_CHECKPOINT, "no weights were written")
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.parts, names):
            path.rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def _verify(shapes: dict[str, tuple[int, ...]], config: dict) -> None:
    """Every tensor the LLaVA model needs is there with its shape, and nothing else."""
    from .backends.original_llava import expected_shapes

    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(expected[k]) != tuple(shapes[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            detail = ", ".join(f"{k} {shapes.get(k, '')} vs {expected.get(k, '')}" if label == "wrong shape" else k
                               for k in keys[:5])
            problems.append(f"{label}: {detail}{' ...' if len(keys) > 5 else ''}")
    if problems:
        raise EngineError(BAD_CHECKPOINT, "the converted weights do not match the LLaVA config: " + "; ".join(problems))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_extras(src: Path, tmp: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file() and not (tmp / name).exists():
            shutil.copy2(src / name, tmp / name)
            copied.append(name)
    return copied


# -- the two layouts ---------------------------------------------------------------------------
def _tower_folder(src: Path, config: dict, vision_tower: Path | None) -> Path | None:
    """The CLIP tower folder: --vision-tower, else mm_vision_tower when it is a local folder."""
    if vision_tower is not None:
        if not (vision_tower / "config.json").is_file():
            raise EngineError(BAD_REQUEST, f"--vision-tower {vision_tower} is not a model folder (config.json missing)")
        return vision_tower
    named = str(config.get("mm_vision_tower") or "")
    for candidate in (Path(named), src / named):
        if named and (candidate / "config.json").is_file():
            return candidate
    return None


def _checkpoint_keys(src: Path, files: list[Path]) -> set[str]:
    """Parameter names of a checkpoint, from its index or headers (pickles: mmap, no data copied)."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / name).is_file():
            return set(json.loads((src / name).read_text())["weight_map"])
    keys: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys.update(f.keys())
        else:
            keys.update(read_weights(path))
    return keys


def _convert_original(src: Path, tmp: Path, config: dict, vision_tower: Path | None, image_size: int | None,
                      dtype: torch.dtype | None) -> dict:
    from transformers import AddedToken, CLIPVisionConfig

    from .backends import original_llava as ol

    ol.check_projector(config)
    files = weight_files(src)
    tower_dir = _tower_folder(src, config, vision_tower)
    named = str(config.get("mm_vision_tower") or "")
    if tower_dir is not None:
        tower_size = int(CLIPVisionConfig.from_pretrained(str(tower_dir), local_files_only=True).image_size)
        size = int(image_size or ol.default_image_size(config, tower_size))
        vision_config = ol.vision_config_from_tower(tower_dir, size)
    else:
        own = any(k.startswith("model.vision_tower.vision_tower.") for k in _checkpoint_keys(src, files))
        known = ol.known_tower_config(named)
        if not (own and known):
            raise EngineError(BAD_REQUEST, (
                f"{src} needs its CLIP vision tower {named!r}: download it yourself and pass its local folder "
                f"with --vision-tower DIR (for GeoChat and LLaVA-1.5: openai/clip-vit-large-patch14-336)"))
        tower_size = int(known["image_size"])
        size = int(image_size or ol.default_image_size(config, tower_size))
        vision_config = ol.known_tower_config(named, size)
    grid = size // vision_config["patch_size"]

    tokenizer = load_tokenizer(src)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    vocab_rows = max(int(config.get("vocab_size", 0)), image_id + 1, len(tokenizer))
    text_config = ol.text_config_from_original(config, vocab_rows)
    out_config = ol.llava_config(config, text_config, vision_config, image_id)
    if dtype is None:
        dtype = DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "keep"), None)

    writer = ShardWriter(tmp, dtype)
    for path in files:
        log.info("converting %s", path.name)
        state = read_weights(path)
        writer.write(ol.map_original_shard(state, vocab_rows, grid, keep_tower=tower_dir is None), path.name)
        del state
    if tower_dir is not None:
        for path in weight_files(tower_dir):
            log.info("converting the vision tower %s", path)
            state = read_weights(path)
            writer.write(ol.map_tower(state, grid), f"{tower_dir.name}/{path.name}")
            del state
    _verify(writer.shapes, out_config)
    shards = writer.finish()

    tokenizer.save_pretrained(str(tmp))
    proc = dict(DEFAULT_PREPROCESSOR)
    tower_proc = tower_dir / "preprocessor_config.json" if tower_dir is not None else None
    if tower_proc is not None and tower_proc.is_file():
        try:
            proc.update({k: v for k, v in json.loads(tower_proc.read_text()).items()
                         if k in ("image_mean", "image_std", "rescale_factor", "resample", "image_processor_type")})
        except ValueError:
            pass
    proc.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    _write_json(tmp / "preprocessor_config.json", proc)
    _copy_extras(src, tmp, ("generation_config.json",))
    source_type = config.get("model_type") or "llava"
    tower_source = str(tower_dir) if tower_dir is not None else f"{named} (weights from the checkpoint)"
    out_config.update(image_size=size, dtype=str(dtype or "float32").replace("torch.", ""),
                      rs_lvlm={"backend": "llava", "conversation": "vicuna_v1", "converted_from": str(src),
                               "source_layout": "original", "source_model_type": source_type,
                               "vision_tower": tower_source, "tower_image_size": tower_size,
                               "mm_use_im_start_end": bool(config.get("mm_use_im_start_end", False)),
                               "name": src.name})
    _write_json(tmp / "config.json", out_config)
    return {"layout": "original", "image_size": size, "tower_image_size": tower_size,
            "position_embeddings_interpolated": size != tower_size, "image_token_index": image_id,
            "vocab_size": vocab_rows, "vision_tower": tower_source, "parameters": writer.parameters,
            "shards": shards}


def _convert_transformers(src: Path, tmp: Path, config: dict, dtype: torch.dtype | None) -> dict:
    from .backends import original_llava as ol

    writer = ShardWriter(tmp, dtype)
    for path in weight_files(src):
        log.info("converting %s", path.name)
        state = read_weights(path)
        renamed = {}
        for key, tensor in state.items():
            name = ol.published_llava_key(key)
            if name is not None:
                renamed[name] = tensor
        writer.write(renamed, path.name)
        del state, renamed
    _verify(writer.shapes, config)
    shards = writer.finish()
    copied = _copy_extras(src, tmp, ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                     "added_tokens.json", "chat_template.jinja", "chat_template.json") + EXTRA_FILES)
    if "tokenizer.json" not in copied:
        load_tokenizer(src).save_pretrained(str(tmp))       # tokenizer.model -> tokenizer.json
    out_config = dict(config)
    vision = config.get("vision_config") or {}
    out_config.setdefault("image_size", int(vision.get("image_size", 336)))
    if dtype is not None:
        out_config["dtype"] = str(dtype).replace("torch.", "")
    out_config["rs_lvlm"] = {**(config.get("rs_lvlm") or {}), "backend": "llava", "conversation": "vicuna_v1",
                             "converted_from": str(src), "source_layout": "transformers", "name": src.name}
    _write_json(tmp / "config.json", out_config)
    return {"layout": "transformers", "image_size": out_config["image_size"], "parameters": writer.parameters,
            "shards": shards}


def convert(src: Path | str, dst: Path | str, vision_tower: Path | str | None = None, image_size: int | None = None,
            dtype: str | None = None) -> dict:
    """Convert the checkpoint folder ``src`` into a new safetensors LLaVA folder ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise EngineError(BAD_REQUEST, f"--from {src} is not a folder")
    if dst.resolve() == src.resolve():
        raise EngineError(BAD_REQUEST, "--to must be a new folder, not the source")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise EngineError(BAD_REQUEST, f"--to {dst} already exists and is not empty")
    if dtype not in (None, *DTYPES):
        raise EngineError(BAD_REQUEST, f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if image_size is not None and image_size <= 0:
        raise EngineError(BAD_REQUEST, "--image-size must be positive")
    config = read_config(src)
    target_dtype = DTYPES.get(dtype) if dtype else None
    tmp = dst.with_name(f".{dst.name}.converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if is_original_llava(config):
            summary = _convert_original(src, tmp, config, Path(vision_tower) if vision_tower else None,
                                        image_size, target_dtype)
        elif config.get("model_type") == "llava":
            if vision_tower or image_size:
                log.warning("--vision-tower / --image-size are ignored for a transformers LLaVA folder")
            summary = _convert_transformers(src, tmp, config, target_dtype)
        else:
            raise EngineError(BAD_REQUEST, (
                f"{src} is neither an original LLaVA/GeoChat checkpoint (config.json with mm_vision_tower) nor a "
                f"transformers LLaVA folder (model_type 'llava'; this one is {config.get('model_type')!r})"))
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"from": str(src), "to": str(dst), **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine convert", description=(
        "Convert a GeoChat / LLaVA-1.5 checkpoint (original layout or transformers layout with .bin files) "
        "into a safetensors folder the engine loads with --model."))
    parser.add_argument("--from", dest="src", required=True, metavar="DIR", help="the downloaded checkpoint folder")
    parser.add_argument("--to", dest="dst", required=True, metavar="DIR",
                        help="the new folder to write (must not exist or be empty)")
    parser.add_argument("--vision-tower", metavar="DIR",
                        help="local folder of the CLIP vision tower named by mm_vision_tower "
                             "(GeoChat / LLaVA-1.5: openai/clip-vit-large-patch14-336)")
    parser.add_argument("--image-size", type=int, metavar="PX",
                        help="vision input size (default: 504 for GeoChat, else the tower's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store the weights in this precision "
                                                                "(default: the checkpoint's torch_dtype)")
    args = parser.parse_args(argv)
    summary = convert(args.src, args.dst, args.vision_tower, args.image_size, args.dtype)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    sys.exit(main())
