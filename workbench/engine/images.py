"""Images of vision-language samples: checked, fingerprinted and thumbnailed before any model loads.

An item's image is a file path (relative to its JSONL file). :func:`image_record` opens it with
Pillow once: a missing, unreadable or non-image file, or one too large to decode, is one
:class:`~workbench.errors.WorkbenchError` line naming it. The record (path, sha256 of the bytes,
size, a PNG thumbnail of at most ``THUMBNAIL`` pixels a side, base64) goes into the sample's
``extra`` JSON, so the run file shows the picture without the original (docs/FORMAT.md, "Images").
:func:`load_image` gives the RGB picture the processor resizes for the model. Pillow only: no torch.
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

THUMBNAIL = 48  # pixels, the longer side of the stored thumbnail
MAX_PIXELS = 64_000_000  # a larger picture is refused before it is decoded (memory stays bounded)


def _open(path: Path, where: str) -> Any:
    """The decoded RGB picture at ``path`` (a PIL image), or one line naming what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise WorkbenchError(f"{where}: image not found: {path}")
    if not path.is_file():
        raise WorkbenchError(f"{where}: {path} is not a file")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise WorkbenchError(f"{where}: {path} is {img.width}×{img.height} pixels, over the "
                                     f"{MAX_PIXELS // 1_000_000} megapixel limit (resize it first)")
            return img.convert("RGB")
    except WorkbenchError:
        raise
    except UnidentifiedImageError:
        raise WorkbenchError(f"{where}: {path} is not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise WorkbenchError(f"{where}: {path} is too large to decode ({e})") from None
    except OSError as e:
        raise WorkbenchError(f"{where}: cannot read the image {path} ({getattr(e, 'strerror', None) or e})") from None
    except (ValueError, SyntaxError) as e:  # a damaged file Pillow half-parsed
        raise WorkbenchError(f"{where}: {path} is a damaged image ({e})") from None


def load_image(path: str | Path, where: str = "image") -> Any:
    """The picture at ``path`` as a PIL RGB image (see :func:`image_record` for the errors)."""
    return _open(Path(path), where)


def thumbnail_png(img: Any, size: int = THUMBNAIL, in_place: bool = False) -> bytes:
    """PNG bytes of ``img`` shrunk to at most ``size`` pixels a side (aspect kept); ``in_place``
    shrinks ``img`` itself (no second full-size copy of a large picture)."""
    small = img if in_place else img.copy()
    small.thumbnail((size, size))
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image_record(path: Path, given: str, where: str) -> dict[str, Any]:
    """What a run file keeps about a sample's image: ``{"given": the path as the data file wrote it,
    "path": the resolved path, "sha256": of the file's bytes, "width", "height", "thumbnail_png":
    base64 PNG}``. Raises :class:`WorkbenchError` naming ``where`` (``file:line``) and the path."""
    img = _open(path, where)
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:  # in blocks: a large file is not held twice
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    except OSError as e:
        raise WorkbenchError(f"{where}: cannot read the image {path} ({e.strerror})") from None
    width, height = img.width, img.height
    return {"given": given, "path": str(path), "sha256": digest, "width": width, "height": height,
            "thumbnail_png": base64.b64encode(thumbnail_png(img, in_place=True)).decode("ascii")}


def thumbnail_from_extra(extra: dict[str, Any]) -> bytes | None:
    """The PNG bytes of the thumbnail a sample's ``extra`` holds (:func:`image_record`), or None."""
    record = extra.get("image") if isinstance(extra, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("thumbnail_png"), str):
        return None
    try:
        return base64.b64decode(record["thumbnail_png"], validate=True)
    except ValueError:
        return None


def image_inputs(model: Any, images: list[Any], ids: Any) -> dict[str, Any]:
    """The image keywords of one forward of a loaded vision-language model over ``ids`` ``[B, len]``
    (torch, padded either side; one picture per row, ``images`` PIL): the processor's pixel values
    in the model's dtype and, where the family takes them (Gemma3), ``token_type_ids`` ``[B, len]``
    (1 exactly on the image tokens, 0 on text and padding)."""
    enc = model.processor.image_processor(images, return_tensors="pt")
    kwargs = {k: v.to(model.device) for k, v in enc.items() if hasattr(v, "to") and k != "num_crops"}
    kwargs["pixel_values"] = kwargs["pixel_values"].to(model.hf.dtype)
    if "token_type_ids" in getattr(model.processor, "model_input_names", ()):
        kwargs["token_type_ids"] = (ids == model.image_token_id).long()
    return kwargs
