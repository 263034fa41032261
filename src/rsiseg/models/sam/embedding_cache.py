"""Image embeddings of a frozen SAM image encoder, kept on disk and found again by content.

With ``model.sam.trainable: decoder`` nothing in the image encoder trains, so an image always encodes
to the same embedding; encoding is by far the most expensive part of SAM (ViT-B: about 16 s per image
on a 2-core CPU). ``model.sam.embedding_cache: DIR`` stores each embedding, float16, in
``DIR/<key>.pt``, where the key hashes the image's bytes and shape and the encoder's *fingerprint*
(every weight and buffer of the encoder, the input normalisation, the input side and torch's version).
A view seen again (the same image under the same flips, the teacher's pass of a later epoch, every evaluation) is
read instead of encoded. Embeddings are always returned through float16, hit or miss, so a run gives
the same numbers whether the cache is cold or warm.

The caller chooses what is cached: the teacher's views, the images of supervised training and of
evaluation; not the student's strongly augmented views (random noise, never seen again), and not the
answers of ``predict``/``prompt``/``info`` (new images, or timings that must include the encoder). The
config refuses the cache where no training view would recur (colour jitter, random rescaling). The
fingerprint is computed at the first use and again after any ``load_state_dict`` (resume, evaluation
of a checkpoint), so changed weights never read old files.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rsiseg.fileio import atomic_write


def tensor_digest(hasher: hashlib._Hash, tensor: Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and bytes (on the CPU, contiguous) to ``hasher``."""
    hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


class EmbeddingCache:
    """``DIR/<key>.pt`` files of float16 ``[D, e, e]`` embeddings (see the module docstring).

    Args:
        folder: the cache folder (created at the first write).
        encoder: the frozen image encoder whose embeddings are cached.
        normalisation: the per-band mean and std the input frames are normalised with.
        image_size: the encoder's input side S.
    """

    def __init__(self, folder: str | Path, encoder: nn.Module,
                 normalisation: tuple[Sequence[float], Sequence[float]], image_size: int) -> None:
        self.folder, self.encoder = Path(folder), encoder
        values = [[float(v) for v in part] for part in normalisation]
        self.salt = f"rsiseg-sam-embedding-v1/torch {torch.__version__}/{image_size}/{values}".encode()
        self._fingerprint: bytes | None = None
        self.hits = self.misses = 0

    def forget_fingerprint(self, *_: object) -> None:
        """The encoder's weights may have changed (a state dict was loaded): fingerprint it again at next use.
        Also the encoder's ``load_state_dict`` post hook (called with the module and the key report)."""
        self._fingerprint = None

    def fingerprint(self) -> bytes:
        """16 bytes that change with any weight or buffer of the encoder, and with the salt."""
        if self._fingerprint is None:
            hasher = hashlib.blake2b(self.salt, digest_size=16)
            for name, tensor in self.encoder.state_dict().items():
                hasher.update(name.encode())
                tensor_digest(hasher, tensor)
            self._fingerprint = hasher.digest()
        return self._fingerprint

    def key(self, image: Tensor) -> str:
        """The file stem of ``image``'s (float ``[C, H, W]``) embedding under the current encoder."""
        hasher = hashlib.blake2b(self.fingerprint(), digest_size=20)
        tensor_digest(hasher, image)
        return hasher.hexdigest()

    def read(self, key: str, device: torch.device) -> Tensor | None:
        """The stored float16 embedding of ``key`` on ``device``, or None."""
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location=device, weights_only=True)

    def write(self, key: str, embedding: Tensor) -> None:
        """Store one float16 embedding ``[D, e, e]`` atomically."""
        buffer = io.BytesIO()
        torch.save(embedding.detach().to("cpu", torch.float16).clone(), buffer)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / f"{key}.pt", lambda handle: handle.write(buffer.getvalue()), binary=True)
