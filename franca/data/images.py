"""Decoding of untrusted image bytes and the one canonical form of a kept image (issue 12).

* ``open_image`` decodes only the formats of ``ALLOWED_FORMATS`` (Pillow's ``formats=`` allow-list), so bytes of
  any other kind (EPS, which Pillow hands to Ghostscript, PSD, ICNS...) never reach another decoder: they are
  ``not_an_image``. MPO (multi-picture JPEG: its first picture) is allowed, and AVIF where this Pillow has AVIF.
* ``canonical_image`` is the canonical conversion used by the fetcher (``franca.data.fetch``), the shard stage
  (folder and ImageNet-21K tar ingest go through it, ``franca.data.manifest.canonicalise_shard``) and the decoder
  of training samples (``franca.data.shards.decode_sample``): first frame, EXIF orientation applied (upright),
  8-bit RGB, or 8-bit RGBA when the image has an alpha channel or a transparent colour. 16-bit grey is scaled
  (``v * 255 / 65535``, rounded), never clipped.
* ``canonical_encode`` keeps served bytes that already are canonical (JPEG or 8-bit PNG, mode RGB/RGBA, upright)
  and stores every other image as a lossless PNG of its canonical form; the result depends on the bytes only.
* ``clean_message`` removes object addresses (``<... object at 0x7f...>``) from an error text, so status tables are
  byte-identical across reruns.
"""

from __future__ import annotations

import io
import re
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError, features

__all__ = [
    "ALLOWED_FORMATS",
    "FORMAT_EXT",
    "ImageCheckError",
    "clean_message",
    "open_image",
    "check_image",
    "orientation",
    "transpose_upright",
    "canonical_image",
    "is_canonical",
    "canonical_encode",
    "encode_png",
    "BoundedInflater",
    "bounded_decompress",
]

Image.init()  # register every plugin, so that the allow-list below names loaded decoders only
_BASE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG's opener also gives MPO (format "MPO")
_AVIF = ("AVIF",) if features.check("avif") and "AVIF" in Image.OPEN else ()
ALLOWED_FORMATS: tuple[str, ...] = tuple(f for f in _BASE_FORMATS if f in Image.OPEN) + _AVIF
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
FORMAT_EXT.update(MPO="jpg", AVIF="avif")
# EXIF orientation tag (0x0112) -> the transpose that makes the image upright (EXIF 2.32, table of "Orientation")
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


class ImageCheckError(ValueError):
    """An image that fails the decode check; ``reason`` is the manifest failure reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(clean_message(f"{reason}: {message}"))
        self.reason = reason


def clean_message(text: str) -> str:
    """``text`` without object addresses (``<_io.BytesIO object at 0x7f..>`` -> ``<_io.BytesIO>``)."""
    return _ADDRESS.sub("", str(text))


def open_image(data: bytes, where: str = "") -> Image.Image:
    """Pillow image of ``data`` (header read, not decoded) if its format is in ``ALLOWED_FORMATS``.

    Raises ImageCheckError ``not_an_image`` (other formats too: no other decoder is ever tried) or
    ``too_many_pixels`` (Pillow's decompression-bomb limit).
    """
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageCheckError("too_many_pixels", f"{where} {exc}") from exc
    except UnidentifiedImageError as exc:
        kinds = ", ".join(ALLOWED_FORMATS)
        raise ImageCheckError("not_an_image", f"{where} not a {kinds} image ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise ImageCheckError("not_an_image", f"{where} {type(exc).__name__}: {exc}") from exc


def check_image(data: bytes, max_pixels: int | None = None, where: str = "") -> Image.Image:
    """Open (allow-list) and fully decode ``data``; the pixel limit is checked on the header, before decoding.

    Raises ImageCheckError with reason ``not_an_image``, ``too_many_pixels``, ``truncated`` or ``decode_error``.
    """
    image = open_image(data, where)
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageCheckError("too_many_pixels", f"{where} {width}x{height} > {max_pixels} pixels")
    try:
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, zlib.error, struct.error... on damaged data
        reason = "truncated" if "truncat" in str(exc).lower() else "decode_error"
        raise ImageCheckError(reason, f"{where} {type(exc).__name__}: {exc}") from exc
    return image


def orientation(image: Image.Image) -> int:
    """EXIF orientation of ``image`` (1 = upright; 1 when absent or unreadable)."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block is treated as absent
        return 1
    return value if value in _UPRIGHT else 1


def transpose_upright(image: Image.Image, value: int) -> Image.Image:
    """``image`` turned by the transpose of EXIF orientation ``value`` (also used on a sample's mask)."""
    return image.transpose(_UPRIGHT[value]) if value in _UPRIGHT else image


def _to_8bit(image: Image.Image) -> Image.Image:
    """8-bit RGB or RGBA of any decoded mode; 16/32-bit integer grey scaled from [0, 65535] by 255 / 65535."""
    if image.mode in ("RGB", "RGBA"):
        return image
    if image.mode.startswith("I"):  # I, I;16, I;16B...: 16-bit PNG / TIFF grey
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        raise ImageCheckError("unsupported_mode", "floating-point images (mode F) have no defined 8-bit scale")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def canonical_image(image: Image.Image) -> Image.Image:
    """The canonical form of a decoded image: first frame, upright (EXIF orientation applied), 8-bit RGB/RGBA."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    value = orientation(image)
    out = _to_8bit(image)
    return transpose_upright(out, value)


def _png_bit_depth(data: bytes) -> int:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 8


def is_canonical(image: Image.Image, data: bytes) -> bool:
    """True when ``data`` (decoded as ``image``) can be stored as it is: JPEG or 8-bit PNG, RGB/RGBA, upright."""
    if image.format == "JPEG":
        return image.mode == "RGB" and orientation(image) == 1
    if image.format == "PNG":
        return image.mode in ("RGB", "RGBA") and _png_bit_depth(data) == 8 and orientation(image) == 1
    return False


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG of an RGB/RGBA image (its ICC profile kept); the bytes depend on the pixels only."""
    buf = io.BytesIO()
    icc = image.info.get("icc_profile")
    image.save(buf, format="PNG", compress_level=6, **({"icc_profile": icc} if icc else {}))
    return buf.getvalue()


def canonical_encode(data: bytes, *, max_pixels: int | None = None, where: str = "") -> tuple[bytes, str, Image.Image]:
    """(bytes to store, extension ``jpg``/``png``, decoded canonical image) of untrusted image bytes.

    Canonical bytes are kept as they are; anything else is stored as a PNG of ``canonical_image``.
    Raises ImageCheckError (see ``check_image``).
    """
    image = check_image(data, max_pixels=max_pixels, where=where)
    if is_canonical(image, data):
        return data, FORMAT_EXT[image.format], image
    canon = canonical_image(image)
    return encode_png(canon), "png", canon


class BoundedInflater:
    """Incremental gzip / zlib / raw-deflate decoder whose output never exceeds ``limit`` bytes: each input chunk
    is inflated at most ``limit + 1 - produced`` bytes at a time (a 64 KiB chunk of zeros cannot become 64 MB).

    ``encoding``: ``gzip`` (several members allowed), ``deflate`` (zlib-wrapped, or raw as some servers send) or
    ``identity``. ``feed`` raises ValueError past ``limit`` and zlib.error on damaged data; ``finish`` raises
    EOFError when the stream stopped before its end marker.
    """

    def __init__(self, encoding: str, limit: int):
        if encoding not in ("gzip", "deflate", "identity"):
            raise ValueError(f"unsupported content encoding {encoding!r}")
        self.encoding, self.limit, self.out = encoding, limit, bytearray()
        self._z = None

    def _new(self, first: bytes):
        if self.encoding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        zlib_header = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> None:
        if self.encoding == "identity":
            self.out += data
        while data and self.encoding != "identity":
            self._z = self._z or self._new(data)
            self.out += self._z.decompress(data, self.limit + 1 - len(self.out))  # max_length >= 1 (0: unbounded)
            if len(self.out) > self.limit:
                break
            data = self._z.unconsumed_tail
            if self._z.eof:  # next gzip member, if any
                data, self._z = self._z.unused_data, None
        if len(self.out) > self.limit:
            raise ValueError(f"decompressed size > {self.limit} bytes")

    def finish(self) -> bytes:
        while self._z is not None and not self._z.eof:  # output zlib still holds back
            piece = self._z.decompress(b"", self.limit + 1 - len(self.out))
            if not piece:
                raise EOFError("compressed stream ended before its end marker")
            self.out += piece
            if len(self.out) > self.limit:
                raise ValueError(f"decompressed size > {self.limit} bytes")
        return bytes(self.out)


def bounded_decompress(data: bytes, limit: int, encoding: str = "gzip") -> bytes:
    """Decompress a whole gzip (default) or deflate ``data`` into at most ``limit`` bytes (see BoundedInflater)."""
    inflater = BoundedInflater(encoding, limit)
    inflater.feed(data)
    return inflater.finish()
