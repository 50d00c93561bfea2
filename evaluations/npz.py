"""ADM-style image batches (`arr_0`: uint8 N x H x W x 3), checked up front and read in batches, so
50K 256x256 samples never have to sit in memory at once."""
import os
import zipfile

import numpy as np

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def check_images(shape, dtype, name):
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{name}: arr_0 must be uint8 images, got dtype {np.dtype(dtype)}")
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"{name}: arr_0 must be N x H x W x 3 (channels last), got shape {tuple(shape)}")


class ArrayImages:
    """Images already in memory, with the same interface as NpzImages."""

    def __init__(self, images, name="images"):
        images = np.asarray(images)
        check_images(images.shape, images.dtype, name)
        self.images, self.name, self.path, self.shape = images, name, None, images.shape

    def batches(self, batch_size):
        for start in range(0, len(self.images), batch_size):
            yield self.images[start:start + batch_size]


class NpzImages:
    """The `arr_0` of an .npz, validated from its header alone."""

    def __init__(self, path):
        self.path = self.name = path
        self.shape, self._fortran_order = self._header()

    def _open_array(self, archive):
        if "arr_0.npy" not in archive.namelist():
            found = ", ".join(n[:-4] for n in archive.namelist()) or "nothing"
            raise ValueError(f"{self.path}: no arr_0 image array (found: {found})")
        return archive.open("arr_0.npy")

    def _header(self):
        with self._zip() as archive, self._open_array(archive) as f:
            shape, fortran_order, dtype = _read_npy_header(f, self.path)
        check_images(shape, dtype, self.path)
        return shape, fortran_order

    def _zip(self):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            return zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ValueError(f"{self.path}: not an .npz file") from None

    def batches(self, batch_size):
        if self._fortran_order:  # not stored image by image: fall back to loading it whole
            yield from ArrayImages(np.load(self.path)["arr_0"], self.path).batches(batch_size)
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with self._zip() as archive, archive.open("arr_0.npy") as f:
            _read_npy_header(f, self.path)
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                data = f.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise ValueError(f"{self.path}: arr_0 is truncated")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def _read_npy_header(f, name):
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{name}: unsupported .npy format version {version} for arr_0")
    return readers[version](f)


def open_images(source, name="images"):
    """NpzImages for a path, ArrayImages for an array."""
    return NpzImages(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else ArrayImages(source, name)


def stored_statistics(path):
    """The precomputed Inception statistics (mu, sigma, mu_s, sigma_s) a reference batch carries, if any."""
    with np.load(path) as f:
        return {k: f[k] for k in STAT_KEYS if k in f.files}
