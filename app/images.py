"""The app's results, kept in memory and served from /results/<token>.png: nothing is written to disk.

Gradio saves every image a function returns into its temp folder and names it by its absolute path in the
result; this store instead holds the PNG bytes of the latest results, up to `max_bytes` (oldest dropped first), and
hands out unguessable URLs. A URL whose image was dropped answers 404.
"""

import io
import secrets
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image

PREFIX = "/results/"
DEFAULT_MAX_MB = 256


class ImageStore:
    def __init__(self, max_bytes: int = DEFAULT_MAX_MB * 2**20):
        self.max_bytes = max_bytes
        self.images: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def add(self, image: np.ndarray) -> str:
        """An H x W x 3 uint8 image -> its token (the file name under PREFIX)."""
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        data = buffer.getvalue()
        token = secrets.token_urlsafe(16) + ".png"
        with self.lock:
            self.images[token] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes and len(self.images) > 1:
                _, old = self.images.popitem(last=False)
                self.bytes -= len(old)
        return token

    def get(self, token: str) -> bytes | None:
        with self.lock:
            return self.images.get(token)

    def __len__(self) -> int:
        return len(self.images)
