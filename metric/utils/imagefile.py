"""Reading one image file: its size from the header, a pixel budget, decoding, library messages.

Every image the project decodes (training, evaluation, extraction, export checks) goes through
:func:`load_image`:

- **Pixel budget** (``DATA_LOADER.MAX_IMAGE_PIXELS``). The width and height are read from the
  file's header (JPEG, PNG, WebP, BMP, GIF, TIFF: a few bytes, nothing is decoded) and an image
  above the budget is refused before OpenCV allocates it: a 20000 x 20000 "decompression bomb"
  of a few hundred kilobytes would otherwise take 1.2 GB per decode, in every worker. The image
  counts as unreadable (replaced in training, listed in ``failed_images`` at extraction). Other
  formats are decoded unchecked (OpenCV's own limit of 2^30 pixels applies).
- **Library messages.** libjpeg and libpng print to the process's stderr themselves ("Corrupt
  JPEG data: ...", "libpng error: ..."). Those are caught (:mod:`metric.utils.native_stderr`)
  and returned with the image, for the caller to log with the image's name; they never reach
  the terminal on their own.
"""

import struct

import cv2
import numpy as np

from metric.utils import native_stderr

# DATA_LOADER.MAX_IMAGE_PIXELS by default: Pillow's limit (about 9459 x 9459 pixels).
DEFAULT_MAX_PIXELS = 89_478_485


def load_image(path, max_pixels=DEFAULT_MAX_PIXELS, exif_orientation=True):
    """``(image, note)``: the RGB uint8 ``[H, W, 3]`` image of ``path`` (a file path, or the
    file's bytes as a uint8 array) and ``None``, or ``None`` and why it cannot be used, or the
    image and what the image library said while decoding it (a corrupt but decodable file).
    ``max_pixels``: refuse images whose header gives more pixels (0: no limit).
    ``exif_orientation``: turn the image as its EXIF orientation tag says (OpenCV's default);
    False gives the pixels as stored, the frame PIL's ``Image.open`` gives and in which box
    coordinates such as revisitop's ``bbx`` are written."""
    try:
        data = np.fromfile(path, dtype=np.uint8) if isinstance(path, str) else path
    except OSError as err:  # missing, unreadable, a folder: the caller decides what a bad image means
        return None, f"cannot be read ({err.strerror or err})"
    if data.size == 0:
        return None, "is an empty file"
    size = header_size(data)
    if size is not None and max_pixels and size[0] * size[1] > max_pixels:
        return None, (
            f"is {size[0]} x {size[1]} pixels, above the limit of {max_pixels} (DATA_LOADER.MAX_IMAGE_PIXELS)"
        )
    with native_stderr.captured() as said:
        im = cv2.imdecode(data, cv2.IMREAD_COLOR | (0 if exif_orientation else cv2.IMREAD_IGNORE_ORIENTATION))
    if im is None:
        return None, "cannot be decoded" + (f" ({_one_line(said.text)})" if said.text else "")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB), (_one_line(said.text) or None)


def _one_line(text):
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def header_size(data):
    """``(width, height)`` from the header of an image file's bytes (a uint8 array or bytes), or
    ``None`` when the format is not one of JPEG, PNG, WebP, BMP, GIF, TIFF or the header is
    malformed (decoding then decides)."""
    data = memoryview(np.asarray(data, dtype=np.uint8).reshape(-1)) if not isinstance(data, bytes) else data
    try:
        return _size(lambda offset, n: bytes(data[offset : offset + n]))
    except (struct.error, IndexError, ValueError):
        return None


def file_header_size(path):
    """:func:`header_size` of the file at ``path`` (reading only its header), or ``None`` (also
    when it cannot be read)."""
    try:
        with open(path, "rb") as f:

            def get(offset, n):
                f.seek(offset)
                return f.read(n)

            return _size(get)
    except (OSError, struct.error, IndexError, ValueError):
        return None


def within_budget(path, max_pixels=DEFAULT_MAX_PIXELS):
    """False if the header of the file at ``path`` gives more than ``max_pixels`` pixels."""
    size = file_header_size(path) if max_pixels else None
    return size is None or size[0] * size[1] <= max_pixels


def _size(get):
    head = get(0, 32)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(get)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return _positive(*struct.unpack(">II", head[16:24]))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _positive(*struct.unpack("<HH", head[6:10]))
    if head.startswith(b"BM"):
        (dib,) = struct.unpack("<I", head[14:18])
        if dib == 12:  # BITMAPCOREHEADER
            return _positive(*struct.unpack("<HH", head[18:22]))
        w, h = struct.unpack("<ii", head[18:26])
        return _positive(abs(w), abs(h))  # a negative height: rows stored top-down
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(get, "<" if head[:2] == b"II" else ">")
    return None


def _positive(w, h):
    return (int(w), int(h)) if w > 0 and h > 0 else None


def _jpeg_size(get):
    """The frame header (SOFn) of a JPEG, found by walking the marker segments."""
    pos = 2
    while True:
        head = get(pos, 4)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA) or len(head) < 4:  # end of image, or a scan before any frame header
            return None
        length = head[2] << 8 | head[3]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15 (not DHT, JPG, DAC)
            frame = get(pos + 4, 5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return _positive(width, height)  # height 0: defined later (DNL); decoding decides
        pos += 2 + length


def _webp_size(head):
    chunk = head[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        w, h = struct.unpack("<HH", head[26:30])
        return _positive(w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one, after the signature byte
        (bits,) = struct.unpack("<I", head[21:25])
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":  # extended: the canvas, 24-bit sizes minus one
        return _positive(int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
    return None


def _tiff_size(get, endian):
    """ImageWidth (256) and ImageLength (257) of the first image file directory."""
    (ifd,) = struct.unpack(endian + "I", get(4, 4))
    (count,) = struct.unpack(endian + "H", get(ifd, 2))
    size = {}
    for k in range(min(count, 4096)):
        entry = get(ifd + 2 + 12 * k, 12)
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag in (256, 257) and kind in (3, 4):  # SHORT or LONG
            size[tag] = struct.unpack(endian + ("H" if kind == 3 else "I"), entry[8 : 10 if kind == 3 else 12])[0]
        if len(size) == 2:
            return _positive(size[256], size[257])
    return None
