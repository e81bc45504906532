"""Image preprocessing for Llama 4's vision engine, in numpy and Pillow (no torch).

Reproduces transformers' `Llama4ImageProcessor` (the torchvision backend, the one Llama 4 ships with) and
`Llama4Processor`'s placeholder expansion exactly:

- the image becomes RGB (transparency composited onto white, as `convert_to_rgb` does);
- the best canvas of at most `max_patches` tiles is chosen (`get_best_fit`, with its float32 scales), the image
  resized into it without distortion (never upscaled past one tile) and padded with black on the right and bottom;
- resizing is torch's uint8 antialiased bilinear kernel (`_upsample_bilinear2d_aa` on uint8, the kernel torchvision
  runs for uint8 CPU images): separable, width first, int16 fixed-point weights at the largest precision (<= 22
  bits) at which the largest weight fits, each pass rounded and clamped to uint8. Pillow's own BILINEAR resize is
  the same filter with 22-bit weights and differs by one level on a few pixels, so it is not used for resizing;
- rescale by 1/255 and normalize in bfloat16, as the reference does (`rescale_and_normalize`), each step rounded
  to bfloat16; the values are returned as float32 holding those bfloat16 values;
- more than one tile adds a global tile: the whole image resized (with distortion) to one tile.

Letters: T tiles, C channels (3), S the tile side (image_size), H/W image height/width.
"""

from __future__ import annotations

import io
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# A stated limit on decoded pixels (Pillow's own bomb guard warns at 89M and refuses at 179M): larger images are
# refused before decoding, so a small compressed file cannot exhaust memory.
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_BYTES = 64 << 20  # an encoded image file read from disk


class ImageError(ValueError):
    """An image the runtime cannot take, said in one sentence."""


@dataclass(frozen=True)
class ImageSpec:
    """What preprocessing needs to know: the processor's settings and the vision model's patch geometry."""

    tile_size: int = 336  # image_size: the side of one tile
    max_patches: int = 16  # at most this many tiles (the global tile comes on top)
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resize_to_max_canvas: bool = False

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens one tile becomes: patches per tile over the pixel shuffle's downsampling."""
        downsample = int(round(1.0 / (self.pixel_shuffle_ratio**2)))
        return (self.tile_size // self.patch_size) ** 2 // downsample


@dataclass(frozen=True)
class ImageTokens:
    """The token ids the placeholder expansion writes (the tokenizer's Llama 4 image special tokens)."""

    image: int  # <|image|>: the placeholder in a prompt, and the marker before the global tile
    image_start: int
    image_end: int
    patch: int  # <|patch|>: the positions image features replace (the model's image_token_index)
    tile_x_separator: int
    tile_y_separator: int


@dataclass(frozen=True)
class PreparedImage:
    pixel_values: np.ndarray  # [T, C, S, S] float32 (bfloat16 values)
    aspect_ratio: tuple[int, int]  # tiles down, tiles across (the global tile not counted)

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])


# -- decoding -----------------------------------------------------------------------------------------------------


def open_image(source, name: str = "image"):
    """A PIL image from a PIL image, an HWC uint8 array, a file path or encoded bytes; EXIF orientation applied
    to decoded files (as transformers' `load_image` does), the first frame of an animation, 8 bits per channel."""
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        return _check_mode(source, name)
    if isinstance(source, np.ndarray):
        return Image.fromarray(_checked_array(source, name))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(f"{name} is empty (0 bytes)")
        stream, label = io.BytesIO(data), name
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name} {str(path)!r} is not a file")
        stream, label = path, f"{name} {str(path)!r}"
    else:
        raise ImageError(f"{name} is a {type(source).__name__}; give a PIL image, an HWC uint8 array, a path or bytes")
    try:
        with Image.open(stream) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{label} has {width}x{height} = {width * height} pixels, more than the limit of "
                    f"{MAX_IMAGE_PIXELS} (a decompression bomb or an image too large to encode)"
                )
            if width == 0 or height == 0:
                raise ImageError(f"{label} is {width}x{height}: an image with no pixels")
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:  # an animation: its first frame is the image (as a browser's still of a GIF)
                log.warning("%s is animated (%d frames); its first frame is taken", label, frames)
            opened.seek(0)
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = image.copy() if image is opened else image
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its warning size: before ours could run
        raise ImageError(
            f"{label} declares more pixels than the limit of {MAX_IMAGE_PIXELS} (a decompression bomb or an image "
            "too large to encode)"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{label} cannot be decoded as an image (truncated or corrupt): {error}") from None
    return _check_mode(image, label)


def _check_mode(image, name: str):
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name} is {image.width}x{image.height}: an image with no pixels")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name} has {image.width * image.height} pixels, more than the limit of {MAX_IMAGE_PIXELS}")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise ImageError(
            f"{name} has {image.mode!r} pixels (16- or 32-bit); give 8 bits per channel (L, LA, P, RGB or RGBA)"
        )
    return image


def _checked_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(f"{name} is a {array.dtype} array; give uint8 (HWC with 1, 3 or 4 channels, or HW)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(f"{name} has shape {tuple(array.shape)}; give HW or HWC with 3 or 4 channels")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name} has shape {tuple(array.shape)}: an image with no pixels")
    return np.ascontiguousarray(array)


def rgb_array(image) -> np.ndarray:
    """[H, W, 3] uint8: transparency (an alpha band or a palette's transparent index) composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _rgb_from_array(array: np.ndarray) -> np.ndarray:
    """HW or HWC uint8 -> [H, W, 3], as the reference's torchvision backend treats arrays: alpha blended onto white
    in float32 on [0, 1], then back to uint8 by torchvision's `to_dtype` (times 255.999, truncated)."""
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        unit = array.astype(np.float32) * np.float32(1.0 / 255)
        alpha = unit[..., 3:]
        blended = unit[..., :3] * alpha + (np.float32(1) - alpha)
        return (blended * np.float32(255 + 1.0 - 1e-3)).astype(np.uint8)
    return array


# -- the canvas ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def supported_resolutions(max_patches: int, tile_size: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) canvas of at most `max_patches` tiles, in the reference's order (ties pick the first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for chunks in range(max_patches, 0, -1):
        for factor in sorted(_factors(chunks)):
            by_ratio[factor / (chunks // factor)].append((factor, chunks // factor))
    return tuple((h * tile_size, w * tile_size) for group in by_ratio.values() for h, w in group)


def _factors(n: int) -> set[int]:
    found = set()
    for i in range(1, int(n**0.5) + 1):
        if n % i == 0:
            found.update((i, n // i))
    return found


def best_fit(height: int, width: int, resolutions, resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """The canvas the image fits with the least scaling (`get_best_fit`; its scales are float32)."""
    canvas = np.asarray(resolutions, dtype=np.int64)
    scale_h = canvas[:, 0].astype(np.float32) / np.float32(height)
    scale_w = canvas[:, 1].astype(np.float32) / np.float32(width)
    scales = np.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = canvas[scales == chosen]
    best = candidates[int(np.argmin(candidates[:, 0] * candidates[:, 1]))]
    return int(best[0]), int(best[1])


class _Num:
    """A number as the reference holds it: a Python int/float (double arithmetic) or a 0-dim tensor (float32)."""

    def __init__(self, value, f32: bool):
        self.value, self.f32 = value, f32


def _resize_target(height: int, width: int, canvas: tuple[int, int], spec: ImageSpec) -> tuple[int, int]:
    """The size the image is resized to inside its canvas, as the reference computes it, types included: the
    canvas sides are tensors there, so a side taken from the canvas brings float32 arithmetic with it."""
    if spec.resize_to_max_canvas:
        target_h, target_w = _Num(canvas[0], True), _Num(canvas[1], True)
    else:
        # min(max(side, tile), canvas_side) is the canvas tensor only when that is strictly smaller
        ceiling_h, ceiling_w = max(height, spec.tile_size), max(width, spec.tile_size)
        target_h = _Num(canvas[0], True) if canvas[0] < ceiling_h else _Num(ceiling_h, False)
        target_w = _Num(canvas[1], True) if canvas[1] < ceiling_w else _Num(ceiling_w, False)
    scale_w, scale_h = _ratio(target_w, width), _ratio(target_h, height)
    if _less(scale_w, scale_h):
        new_w = target_w.value
        new_h = min(_floor_times(height, scale_w), target_h.value)
    else:
        new_h = target_h.value
        new_w = min(_floor_times(width, scale_h), target_w.value)
    return max(int(new_h), 1), max(int(new_w), 1)


def _ratio(target: _Num, size: int) -> _Num:
    if target.f32:
        return _Num(np.float32(target.value) / np.float32(size), True)
    return _Num(target.value / size, False)


def _less(a: _Num, b: _Num) -> bool:
    if a.f32 or b.f32:
        return bool(np.float32(a.value) < np.float32(b.value))
    return a.value < b.value


def _floor_times(size: int, scale: _Num) -> int:
    if scale.f32:
        return int(np.floor(np.float32(size) * scale.value))
    return math.floor(size * scale.value)


# -- resize: torch's uint8 antialiased bilinear kernel -------------------------------------------------------------


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output index its first input index and int16 weights, and the weights' precision, as
    `_compute_index_ranges_int16_weights` computes them (double arithmetic, triangle filter)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # interp_size 2 * 0.5, scaled when downsampling
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    starts = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    w_max = 0.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), in_size) - xmin
        xsize = min(max(xsize, 0), taps)
        total = 0.0
        row = weights[i]
        for j in range(xsize):
            x = abs((j + xmin - center + 0.5) * invscale)
            w = 1.0 - x if x < 1.0 else 0.0
            row[j] = w
            total += w
        if total != 0.0:
            for j in range(xsize):
                row[j] /= total
                w_max = max(w_max, row[j])
        starts[i] = xmin
    precision = 0
    while precision < 22:
        if int(0.5 + w_max * (1 << (precision + 1))) >= (1 << 15):
            break
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return starts, fixed, precision


def _resample_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` of a uint8 [H, W, C] image: rounded, shifted and clamped to uint8."""
    in_size = pixels.shape[axis]
    starts, fixed, precision = _axis_weights(in_size, out_size)
    # int32 is exact: the weights are >= 0 and sum to about 2**precision <= 2**22, times 255 < 2**31
    source = pixels  # uint8 taps times int32 weights give int32 products
    shape = [1] * source.ndim
    shape[axis] = out_size
    acc = np.full(source.shape[:axis] + (out_size,) + source.shape[axis + 1 :], 1 << precision >> 1, dtype=np.int32)
    weights = fixed.astype(np.int32)
    for k in range(fixed.shape[1]):
        index = np.minimum(starts + k, in_size - 1)  # a tap past the edge has weight 0
        acc += np.take(source, index, axis=axis) * weights[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] uint8 -> [height, width, C] uint8, width first, then height; an unchanged side is not resampled."""
    if pixels.shape[:2] == (height, width):
        return pixels
    if pixels.shape[1] != width:
        pixels = _resample_axis(pixels, width, axis=1)
    if pixels.shape[0] != height:
        pixels = _resample_axis(pixels, height, axis=0)
    return pixels


# -- normalize in bfloat16 ----------------------------------------------------------------------------------------


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def _normalize(tile: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 [.., C] -> bfloat16-valued float32: x * rescale, then (x - mean) / std, each step rounded to bf16."""
    x = _bf16(tile.astype(np.float32) * np.float32(spec.rescale_factor))
    mean = _bf16(np.asarray(spec.image_mean, dtype=np.float32))
    std = _bf16(np.asarray(spec.image_std, dtype=np.float32))
    x = _bf16(x - mean)
    return _bf16(x / std)


# -- the processor ------------------------------------------------------------------------------------------------


def preprocess(source, spec: ImageSpec, name: str = "image") -> PreparedImage:
    """One image -> its tiles (row-major, then the global tile when there is more than one) and its tile grid."""
    if isinstance(source, np.ndarray):
        pixels = _rgb_from_array(_checked_array(source, name))
    else:
        pixels = rgb_array(open_image(source, name))
    height, width = pixels.shape[:2]
    canvas = best_fit(height, width, supported_resolutions(spec.max_patches, spec.tile_size), spec.resize_to_max_canvas)
    new_h, new_w = _resize_target(height, width, canvas, spec)
    resized = resize(pixels, new_h, new_w)
    padded = np.zeros((canvas[0], canvas[1], 3), dtype=np.uint8)
    padded[:new_h, :new_w] = resized
    rows, cols, side = canvas[0] // spec.tile_size, canvas[1] // spec.tile_size, spec.tile_size
    normalized = _normalize(padded, spec)  # [canvas_h, canvas_w, C]
    tiles = normalized.reshape(rows, side, cols, side, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, side, side)
    if rows * cols > 1:
        whole = _normalize(resize(pixels, side, side), spec).transpose(2, 0, 1)[None]
        tiles = np.concatenate([tiles, whole], axis=0)
    return PreparedImage(np.ascontiguousarray(tiles, dtype=np.float32), (rows, cols))


def image_token_ids(aspect_ratio: tuple[int, int], tokens_per_tile: int, ids: ImageTokens) -> list[int]:
    """The ids one `<|image|>` placeholder expands to (`Llama4Processor._prompt_split_image`)."""
    rows, cols = aspect_ratio
    out = [ids.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += [ids.patch] * tokens_per_tile
                if x < cols - 1:
                    out.append(ids.tile_x_separator)
            out.append(ids.tile_y_separator)
    out += [ids.image] + [ids.patch] * tokens_per_tile + [ids.image_end]
    return out


def expand_placeholders(
    prompt: list[int], images: list[PreparedImage], tokens_per_tile: int, ids: ImageTokens, name: str = "prompt"
) -> list[int]:
    """A prompt's ids with each `<|image|>` placeholder replaced by its image's tokens, in order; the count of
    placeholders must equal the count of images."""
    placeholders = sum(1 for t in prompt if t == ids.image)
    if placeholders != len(images):
        raise ImageError(
            f"{name} has {placeholders} <|image|> placeholder{'s' * (placeholders != 1)} but "
            f"{len(images)} image{'s' * (len(images) != 1)} {'were' if len(images) != 1 else 'was'} given; "
            "give one image per placeholder"
        )
    out: list[int] = []
    pending = iter(images)
    for token in prompt:
        if token == ids.image:
            out += image_token_ids(next(pending).aspect_ratio, tokens_per_tile, ids)
        else:
            out.append(token)
    return out


# -- image URLs (OpenAI's image_url content parts) ---------------------------------------------------------------


def image_from_url(url: str, allowed_local_media_path: str | Path | None = None, name: str = "image_url") -> bytes:
    """The encoded bytes an `image_url` names: a `data:image/...;base64,` URL, or a `file://` URL (or a plain path)
    inside `allowed_local_media_path`; remote URLs are refused (nothing is fetched from a production server)."""
    import base64
    import binascii
    from urllib.parse import unquote, urlparse

    if not isinstance(url, str) or not url:
        raise ImageError(f"{name} is empty; give a data: URL or a file under --allowed-local-media-path")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or ";base64" not in header:
            raise ImageError(f"{name} is a data: URL without ';base64,'; send the image base64-encoded")
        media = header[len("data:") :].split(";")[0]
        if media and not media.startswith("image/"):
            raise ImageError(f"{name} is a data: URL of {media!r}, not an image")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{name} is a data: URL whose payload is not valid base64") from None
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise ImageError(
            f"{name} is a remote URL ({scheme}); this server does not fetch URLs: send the image as a data: URL, "
            "or as a file under --allowed-local-media-path"
        )
    if scheme not in ("", "file"):
        raise ImageError(f"{name} has the scheme {scheme!r}; use data: or file:")
    if allowed_local_media_path is None:
        raise ImageError(f"{name} names a local file, which this server reads only under --allowed-local-media-path")
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    root = Path(allowed_local_media_path).resolve()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageError(f"{name} names {str(path)!r}, which does not exist") from None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise ImageError(f"{name} names {str(path)!r}, which is not a file under --allowed-local-media-path {root}")
    if resolved.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"{name} names a file of {resolved.stat().st_size} bytes, more than {MAX_IMAGE_BYTES}")
    return resolved.read_bytes()
