"""Images of vision preference rows: what a row may give, how it is stored, and how it is opened again.

A row gives its images in an `images` column (a list) or an `image` column (one image). Each image may be a
PIL image, a `datasets` Image feature value (`{"bytes": ..., "path": ...}`), encoded bytes (PNG, JPEG, ...),
or a path. The stages read paths through `ImageFiles`: a relative path from the data file's directory, and
every path, symlinks followed, must land inside it or `data.image_root`
(`image_outside_source` otherwise), so a row cannot copy an arbitrary file of the machine into the artifact;
under DVC each file read must also be covered by the normalize stage's deps. Every image is stored the same
way, as its encoded bytes and their format (`{"bytes", "format"}`, `IMAGE_TYPE`): files and bytes as they
are (no re-encoding, so the stored bytes are the source's), a PIL image without its source file encoded as
PNG (lossless). Each one is decoded once when stored, so an image that does not decode is the row's
`bad_image`, not a failure at training time. Pixel inputs are made from the stored bytes when a batch is
collated (`pipeline.model.collator.DataCollatorForVisionPreference`), never stored per row.

Messages mark where an image goes with a content part `{"type": "image"}`; `placeholders` counts them.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.errors import PipelineError
from pipeline.data.invalid import InvalidRow

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("format", pa.string())])
IMAGE_COLUMNS = ("images", "image")  # a list of images, or one image


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise PipelineError(
            "vision data needs pillow: pip install 'dpo-pipeline[vision]' (or pip install pillow)."
        ) from None
    return Image


def _decoded_format(data: bytes, where: str) -> str:
    """The format of encoded image bytes, after checking they decode; InvalidRow `bad_image` otherwise."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return (image.format or "unknown").lower()
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise InvalidRow(
            "bad_image",
            f"{where} does not decode as an image ({type(err).__name__}: {err}); re-export it as PNG or JPEG",
        ) from None


@dataclass(frozen=True)
class ImageFiles:
    """Where a row's image paths may be read. `base`: the directory a relative path is read from (None: the
    working directory); `inside`: resolved directories every file must resolve into, symlinks followed (None:
    anywhere, the Python API's in-process datasets); `covered`: under DVC, the running stage's resolved deps,
    one of which must cover each file (None outside DVC)."""

    base: Path | None = None
    inside: tuple[Path, ...] | None = None
    covered: tuple[Path, ...] | None = None

    def read(self, value: str, where: str) -> tuple[bytes, Path]:
        """The bytes of the image file a row names, and its path; InvalidRow when it is outside or unreadable."""
        path = Path(value)
        if not path.is_absolute() and self.base is not None:
            path = self.base / path
        if self.inside is not None:
            real = path.resolve()
            if not any(real == root or root in real.parents for root in self.inside):
                roots = " or ".join(repr(str(root)) for root in self.inside) or "no directory (a Hub dataset)"
                raise InvalidRow(
                    "image_outside_source",
                    f"{where}: the image file {value!r} resolves to {str(real)!r}, outside {roots}; "
                    "images are read only from the data file's directory, so move it there or name "
                    "its directory in data.image_root",
                )
            if self.covered is not None and not any(real == dep or dep in real.parents for dep in self.covered):
                raise PipelineError(
                    f"{where}: the image file {str(path)!r} is not a dependency of the normalize "
                    "stage in dvc.yaml, so DVC would not re-run normalize when it changes; move it "
                    "under data/ or add its directory to stages.normalize.deps in dvc.yaml."
                )
        try:
            return path.read_bytes(), path
        except OSError as err:
            raise InvalidRow(
                "bad_image",
                f"{where}: the image file {str(path)!r} cannot be read ({err.strerror or err}); "
                "paths are relative to the data file's directory",
            ) from None


def stored_image(value: Any, where: str, files: ImageFiles | None = None) -> dict:
    """One image value of a row as `{"bytes", "format"}` (see the module docstring); `where` names it in
    messages (e.g. "images[1]"), `files` says where a path may be read (None: anywhere, relative to the working
    directory)."""
    Image = _pil()
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a datasets Image value, or stored
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise InvalidRow("bad_image", f"{where} has neither bytes nor a path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        image = value if value.mode in ("RGB", "RGBA", "L", "LA", "P", "I", "I;16", "1") else value.convert("RGB")
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "format": "png"}
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"bytes": data, "format": _decoded_format(data, where)}
    if isinstance(value, str) and value:
        data, path = (files or ImageFiles()).read(value, where)
        return {"bytes": data, "format": _decoded_format(data, f"{where} ({path})")}
    raise InvalidRow(
        "bad_image",
        f"{where} is {type(value).__name__}; expected a PIL image, encoded image bytes, "
        "a path, or a datasets Image value",
    )


def row_images(raw: dict, files: ImageFiles | None = None) -> list[dict] | None:
    """The stored images of a raw row (its `images` list or its `image`), None when it has none."""
    given = {column: raw.get(column) for column in IMAGE_COLUMNS if raw.get(column) is not None}
    if len(given) > 1:
        raise InvalidRow("bad_image", "the row has both an 'images' and an 'image' column; give one")
    if not given:
        return None
    column, value = next(iter(given.items()))
    if column == "image":
        return [stored_image(value, "image", files)]
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise InvalidRow(
            "bad_image", f"'images' is {type(value).__name__}; expected a list of images (one image: an 'image' column)"
        )
    images = [stored_image(item, f"images[{i}]", files) for i, item in enumerate(value)]
    return images or None


def open_image(value: Any):
    """An image as a PIL image, decoded: a stored one, or any value `stored_image` takes (a `datasets` Image
    feature hands over PIL images)."""
    Image = _pil()
    if isinstance(value, Image.Image):
        return value
    if not (isinstance(value, dict) and value.get("bytes") is not None):
        value = stored_image(value, "image")
    image = Image.open(io.BytesIO(value["bytes"]))
    image.load()
    return image


# formats a browser shows inline, by their MIME subtype
WEB_FORMATS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "gif": "gif", "webp": "webp", "bmp": "bmp"}


def data_uri(stored: dict) -> str | None:
    """A stored image as a `data:` URI a report can show inline (None for a format browsers do not show)."""
    subtype = WEB_FORMATS.get(str(stored.get("format")).lower())
    if subtype is None:
        return None
    return f"data:image/{subtype};base64,{base64.b64encode(stored['bytes']).decode('ascii')}"


def image_digests(images: list[dict] | None) -> list[str]:
    return [hashlib.sha256(image["bytes"]).hexdigest()[:20] for image in images or []]


def placeholders(messages: Any) -> int:
    """The `{"type": "image"}` content parts of a list of messages."""
    if not isinstance(messages, list):
        return 0
    return sum(
        1
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )
